"""The authors' EPAM-Net as they ship it, in plain PyTorch: the baseline the speed goals of epamx are ratios against.

A re-creation of the computational structure of github.com/ahmed-nady/Multimodal-Action-Recognition (written here,
not copied), op for op and copy for copy, so that timing it times their model:

- ``actionModels/rgb_pose_action_recognition_model.py``, ``RGBPoseAttentionActionRecognizer`` with
  ``attention='CBAM_spatial_efficient_temporal'`` (what their training and evaluation scripts build): both
  backbones, ``torch.index_select`` of the pose frames 0, 3, ..., 45 (a copy), the attention maps S * A, then
  ``rgb + rgb * (S * A)`` as two out-of-place ops, two I3DHeads.
- ``mmaction/models/backbones/x3dTemporalshift.py`` (RGB, ``X3DTemporalShift(gamma_w=1, gamma_b=2.25,
  gamma_d=2.2, se_style='half')``) and ``x3dTShiftPose.py`` (pose, ``X3DTemporalShiftPose(in_channels=17,
  num_stages=3, stage_blocks=(5, 11, 7), conv1_stride=1)``): mmcv ConvModules (conv, BN, in-place ReLU), the
  ``BlockX3D`` temporal shift as ``zeros_like`` plus three slice copies (fold_div 8 for RGB, 4 for pose), the SE
  module (AdaptiveAvgPool3d, 1x1x1 convs, ReLU, Sigmoid, out-of-place multiply), mmcv's Swish (``x *
  torch.sigmoid(x)``: two out-of-place ops), ``out + identity`` out of place, then an in-place ReLU.
- ``actionModels/attention_module.py``, ``CBAMSpatialEfficientTemporalAttention(attention_type='nested')``:
  ChannelPool (max and mean over channels, unsqueezed and concatenated), a (1, 7, 7) 'same' conv + BN
  (momentum 0.01), sigmoid, AdaptiveAvgPool3d((None, 1, 1)), a Conv1d over time, sigmoid, S * A.
- ``mmaction/models/heads/i3d_head.py``, ``I3DHead``: AdaptiveAvgPool3d(1), dropout 0.5, view, linear.

Tensors stay in the default contiguous layout, as the authors run it. Their training wraps the model in
SyncBatchNorm for DDP; in one process that is plain batch norm, which this module uses.

Parameter names are the authors' state-dict keys, so their checkpoints load as they are (``module.`` prefixes
stripped); ``load_epamx_state_dict`` loads the weights of an ``epamx.models.EPAMNet`` so that both models can hold
identical weights. Nothing here imports epamx.

The one generalisation: the authors select the pose frames with ``range(0, 48, 3)``, written for 48 pose and 16 RGB
frames; here the stride is T_pose // T_rgb (the same indices at 48 and 16), so small clips work in tests.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["AuthorsEPAMNet", "load_epamx_state_dict"]


class ConvModule(nn.Module):
    """mmcv's ConvModule as the authors configure it: conv (no bias) -> BN3d -> ReLU(inplace=True) or nothing."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, stride=1, padding=0, groups: int = 1,
                 relu: bool = True):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm3d(out_channels)
        self.activate = nn.ReLU(inplace=True) if relu else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        if self.activate is not None:
            x = self.activate(x)
        return x


class Swish(nn.Module):
    """mmcv's Swish: x * sigmoid(x), two out-of-place ops (not the single fused SiLU kernel)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


def _round_width(width: float, multiplier: float, min_width: int = 8, divisor: int = 8) -> int:
    width *= multiplier
    rounded = max(min_width, int(width + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * width:
        rounded += divisor
    return int(rounded)


class SEModule(nn.Module):
    """X3D's squeeze-and-excitation, module by module as in the authors' backbones."""

    def __init__(self, channels: int, reduction: float):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool3d(1)
        self.bottleneck = _round_width(channels, reduction)
        self.fc1 = nn.Conv3d(channels, self.bottleneck, kernel_size=1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv3d(self.bottleneck, channels, kernel_size=1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * scale


def temporal_shift(x: Tensor, fold_div: int) -> Tensor:
    """BlockX3D.temporalShift: a zero-filled tensor, then three slice copies (the unshifted channels too)."""
    fold = x.shape[1] // fold_div
    out = torch.zeros_like(x)
    out[:, :fold, :-1] = x[:, :fold, 1:]
    out[:, fold:2 * fold, 1:] = x[:, fold:2 * fold, :-1]
    out[:, 2 * fold:, :] = x[:, 2 * fold:, :]
    return out


class BlockX3D(nn.Module):
    """shift -> conv1 (1x1x1, BN, ReLU) -> conv2 (depthwise 1x3x3, BN) -> [SE] -> Swish -> conv3 (1x1x1, BN),
    plus the unshifted input (or its downsample), then an in-place ReLU."""

    def __init__(self, inplanes: int, planes: int, outplanes: int, spatial_stride: int, fold_div: int,
                 downsample: nn.Module = None, se_ratio: float = None):
        super().__init__()
        self.fold_div = fold_div
        self.downsample = downsample
        self.se_ratio = se_ratio
        self.conv1 = ConvModule(inplanes, planes, 1)
        self.conv2 = ConvModule(planes, planes, (1, 3, 3), stride=(1, spatial_stride, spatial_stride),
                                padding=(0, 1, 1), groups=planes, relu=False)
        self.swish = Swish()
        self.conv3 = ConvModule(planes, outplanes, 1, relu=False)
        if se_ratio is not None:
            self.se_module = SEModule(planes, se_ratio)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(temporal_shift(x, self.fold_div))
        out = self.conv2(out)
        if self.se_ratio is not None:
            out = self.se_module(out)
        out = self.conv3(self.swish(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class X3DTemporalShift(nn.Module):
    """The authors' X3DTemporalShift (RGB) / X3DTemporalShiftPose (pose) backbone: a (1, 3, 3) stem ConvModule,
    stages of BlockX3D (SE in blocks 0, 2, 4, ...; spatial stride 2 in each stage's first block), conv5."""

    def __init__(self, in_channels: int, stage_blocks: Sequence[int], conv1_stride: int, fold_div: int,
                 base_channels: int = 24, gamma_b: float = 2.25, se_ratio: float = 1 / 16):
        super().__init__()
        self.conv1_s = ConvModule(in_channels, base_channels, (1, 3, 3), stride=(1, conv1_stride, conv1_stride),
                                  padding=(0, 1, 1))
        self.res_layers = []
        layer_inplanes = base_channels
        for i, num_blocks in enumerate(stage_blocks):
            inplanes = base_channels * 2 ** i
            planes = int(inplanes * gamma_b)
            downsample = ConvModule(layer_inplanes, inplanes, 1, stride=(1, 2, 2), relu=False)
            blocks = [BlockX3D(layer_inplanes if b == 0 else inplanes, planes, inplanes, 2 if b == 0 else 1, fold_div,
                               downsample if b == 0 else None, se_ratio if b % 2 == 0 else None)
                      for b in range(num_blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.res_layers.append(f"layer{i + 1}")
            layer_inplanes = inplanes
        self.feat_dim = int(layer_inplanes * gamma_b)
        self.conv5 = ConvModule(layer_inplanes, self.feat_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1_s(x)
        for name in self.res_layers:
            x = getattr(self, name)(x)
        return self.conv5(x)


class I3DHead(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, dropout_ratio: float = 0.5):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout_ratio)
        self.fc_cls = nn.Linear(in_channels, num_classes)
        self.avg_pool = nn.AdaptiveAvgPool3d((1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(self.avg_pool(x))
        return self.fc_cls(x.view(x.shape[0], -1))


class ChannelPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)


class BasicConv(nn.Module):
    """The attention's spatial conv: Conv3d (no bias, 'same' padding) + BN (momentum 0.01), no ReLU."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size):
        super().__init__()
        self.conv = nn.Conv3d(in_planes, out_planes, kernel_size, padding="same", bias=False)
        self.bn = nn.BatchNorm3d(out_planes, eps=1e-5, momentum=0.01, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class CBAMSpatialEfficientTemporalAttention(nn.Module):
    """The "nested" variant the authors train: returns S * A, (N, 1, T, H, W)."""

    def __init__(self, k: int = 7):
        super().__init__()
        self.compress = ChannelPool()
        self.spatial = BasicConv(2, 1, (1, k, k))
        self.gap_nested = nn.AdaptiveAvgPool3d((None, 1, 1))
        self.conv_temporal_attention = nn.Conv1d(1, 1, kernel_size=k, padding=k // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        bs, _, t, h, w = x.shape
        spatial_attention = self.sigmoid(self.spatial(self.compress(x))).view(bs, 1, t, h, w)
        pooled = self.gap_nested(spatial_attention)
        temporal_attention = self.sigmoid(self.conv_temporal_attention(pooled.view(bs, 1, t))).view(bs, 1, t, 1, 1)
        return spatial_attention * temporal_attention


class AuthorsEPAMNet(nn.Module):
    """The authors' RGBPoseAttentionActionRecognizer (CBAM spatial / efficient temporal attention, nested).

    ``forward(imgs (N, 3, T, H, W), heatmap_imgs (N, 17, T_p, h, w))`` returns ``(rgb_logits, pose_logits)``;
    their evaluation sums the two.
    """

    def __init__(self, num_classes: int = 60, pose_channels: int = 17):
        super().__init__()
        self.rgb_backbone = X3DTemporalShift(3, [math.ceil(2.2 * n) for n in (1, 2, 5, 3)], conv1_stride=2,
                                             fold_div=8)
        self.rgb_cls_head = I3DHead(num_classes, 432)
        self.pose_backbone = X3DTemporalShift(pose_channels, (5, 11, 7), conv1_stride=1, fold_div=4)
        self.pose_cls_head = I3DHead(num_classes, 216)
        self.attention_module = CBAMSpatialEfficientTemporalAttention()
        self.init_weights()

    def init_weights(self) -> None:
        """Their init_weights: Kaiming-normal convs (fan out), BN 1 and 0, linear N(0, 0.01), each block's last BN
        at 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.Conv1d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BlockX3D):
                nn.init.zeros_(m.conv3.bn.weight)

    def forward(self, imgs: Tensor, heatmap_imgs: Tensor) -> Tuple[Tensor, Tensor]:
        rgb_feats = self.rgb_backbone(imgs)
        pose_feats = self.pose_backbone(heatmap_imgs)
        pose_frames, frames = heatmap_imgs.shape[2], imgs.shape[2]
        time_strided_inds = list(range(0, pose_frames, pose_frames // frames))
        time_strided_pose_feats = torch.index_select(pose_feats, 2,
                                                     torch.tensor(time_strided_inds, device=pose_feats.device))
        attention_maps = self.attention_module(time_strided_pose_feats)
        rgb_attended_feats = rgb_feats * attention_maps
        guided_rgb_logits = self.rgb_cls_head(rgb_feats + rgb_attended_feats)
        pose_logits = self.pose_cls_head(pose_feats)
        return guided_rgb_logits, pose_logits


# epamx's names for the attention block -> the authors'; every other key is the same in both.
_FROM_EPAMX = [
    (re.compile(r"^attention_module\.spatial_conv\."), "attention_module.spatial.conv."),
    (re.compile(r"^attention_module\.spatial_bn\."), "attention_module.spatial.bn."),
    (re.compile(r"^attention_module\.temporal_conv\."), "attention_module.conv_temporal_attention."),
]


def load_epamx_state_dict(model: AuthorsEPAMNet, state: Mapping[str, Tensor]) -> AuthorsEPAMNet:
    """Load an epamx ``EPAMNet`` state dict, or an authors' one (``module.`` prefixes allowed), strictly."""
    converted = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        for pattern, replacement in _FROM_EPAMX:
            key = pattern.sub(replacement, key)
        converted[key] = value
    model.load_state_dict(converted, strict=True)
    return model
