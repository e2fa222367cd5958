"""Drop-in torch.nn modules built on epamx.ops."""
from epamx.nn.attention import SpatialTemporalAttention
from epamx.nn.batch_norm_act import batch_norm_act, fused_batch_norm_applies
from epamx.nn.conv_act import conv_act, fused_conv_act_applies
from epamx.nn.pose_heatmaps import PoseHeatmaps
from epamx.nn.temporal_shift import TemporalShift

__all__ = ["PoseHeatmaps", "SpatialTemporalAttention", "TemporalShift", "batch_norm_act", "conv_act",
           "fused_batch_norm_applies", "fused_conv_act_applies"]
