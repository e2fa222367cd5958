"""Fused operators. Each public op calls torch.ops.epamx.<op> and has a plain-PyTorch `<op>_reference`."""
from epamx.ops.attention_reweight import attention_reweight, attention_reweight_reference
from epamx.ops.batch_norm_act import affine_act, affine_act_reference, batch_norm_act, batch_norm_act_reference
from epamx.ops.channel_pool import channel_pool, channel_pool_reference
from epamx.ops.render_heatmaps import (
    COCO17_FLIP_PAIRS,
    COCO17_LIMBS,
    NTU25_BONES,
    NTU25_FLIP_PAIRS,
    render_heatmaps,
    render_heatmaps_reference,
)
from epamx.ops.squeeze_excite import channel_sums, channel_sums_reference, gate_silu_, gate_silu_reference
from epamx.ops.temporal_shift import temporal_shift, temporal_shift_, temporal_shift_reference, temporal_unshift_
from epamx.ops.to_channels_last import to_channels_last, to_channels_last_reference

__all__ = [
    "COCO17_FLIP_PAIRS",
    "COCO17_LIMBS",
    "NTU25_BONES",
    "NTU25_FLIP_PAIRS",
    "attention_reweight",
    "attention_reweight_reference",
    "affine_act",
    "affine_act_reference",
    "batch_norm_act",
    "batch_norm_act_reference",
    "channel_pool",
    "channel_pool_reference",
    "channel_sums",
    "channel_sums_reference",
    "gate_silu_",
    "gate_silu_reference",
    "render_heatmaps",
    "render_heatmaps_reference",
    "temporal_shift",
    "temporal_shift_",
    "temporal_shift_reference",
    "temporal_unshift_",
    "to_channels_last",
    "to_channels_last_reference",
]
