from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from epamx.ops import attention_reweight, attention_reweight_reference, channel_pool, channel_pool_reference


class SpatialTemporalAttention(nn.Module):
    """EPAM-Net's pose-driven spatial-temporal attention (the authors' "nested" CBAM-style block).

    From pose features f_p (N, C_p, T_p, H, W), taken at frames 0, t_stride, 2 t_stride, ...:

        S = sigmoid(BN(Conv3d(2 -> 1, (1, k, k), 'same', no bias)([max_c f_p ; mean_c f_p])))   (N, 1, T, H, W)
        A = sigmoid(Conv1d(1 -> 1, k, padding k // 2, no bias)(mean_{H,W} S))                     (N, 1, T, 1, 1)

    and the RGB features f_r (N, C_r, T, H, W) become f_r + f_r * S * A, with T = ceil(T_p / t_stride).
    107 parameters for k = 7 (98 conv + 2 batch-norm + 7 temporal conv).

    Args:
        kernel_size: k, odd (7 in EPAM-Net).
        t_stride: pose frames per RGB frame (3: 48 pose frames guide 16 RGB frames).
        fused: use the fused epamx ops (channel_pool, attention_reweight); False runs the plain-PyTorch
            reference path, which gives the same results within floating-point rounding.
    """

    def __init__(self, kernel_size: int = 7, t_stride: int = 3, fused: bool = True):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"SpatialTemporalAttention: kernel_size must be an odd int >= 1, got {kernel_size!r}")
        if not isinstance(t_stride, int) or t_stride < 1:
            raise ValueError(f"SpatialTemporalAttention: t_stride must be an int >= 1, got {t_stride!r}")
        self.kernel_size = kernel_size
        self.t_stride = t_stride
        self.fused = fused
        pad = kernel_size // 2
        self.spatial_conv = nn.Conv3d(2, 1, (1, kernel_size, kernel_size), padding=(0, pad, pad), bias=False)
        self.spatial_bn = nn.BatchNorm3d(1, eps=1e-5, momentum=0.01)
        self.temporal_conv = nn.Conv1d(1, 1, kernel_size, padding=pad, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' initialisation: Kaiming-normal convolutions (fan out, ReLU gain), batch norm at 1 and 0."""
        for conv in (self.spatial_conv, self.temporal_conv):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        self.spatial_bn.reset_parameters()

    def maps(self, pose_feats: Tensor, t_stride: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """The spatial map S (N, 1, T, H, W) and the temporal map A (N, 1, T, 1, 1) from pose features, taking
        every ``t_stride``-th frame (default: the module's t_stride)."""
        t_stride = self.t_stride if t_stride is None else t_stride
        if pose_feats.dim() != 5:
            raise ValueError(f"SpatialTemporalAttention: pose_feats must be 5-D (N, C, T, H, W), got shape "
                             f"{tuple(pose_feats.shape)}")
        pool = channel_pool if self.fused else channel_pool_reference
        spatial = torch.sigmoid(self.spatial_bn(self.spatial_conv(pool(pose_feats, t_stride))))
        n, _, t = spatial.shape[:3]
        temporal = torch.sigmoid(self.temporal_conv(spatial.mean(dim=(3, 4)).view(n, 1, t))).view(n, 1, t, 1, 1)
        return spatial, temporal

    def forward(self, rgb_feats: Tensor, pose_feats: Tensor, t_stride: Optional[int] = None) -> Tensor:
        """Reweighted RGB features f_r + f_r * S * A, same shape as rgb_feats (N, C_r, T, H, W); ``t_stride``
        overrides the module's for this call."""
        return self.forward_with_maps(rgb_feats, pose_feats, t_stride)[0]

    def forward_with_maps(self, rgb_feats: Tensor, pose_feats: Tensor,
                          t_stride: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """``forward``'s reweighted features, and the maps S (N, 1, T, H, W) and A (N, 1, T, 1, 1) it used."""
        t_stride = self.t_stride if t_stride is None else t_stride
        if rgb_feats.dim() != 5:
            raise ValueError(f"SpatialTemporalAttention: rgb_feats must be 5-D (N, C, T, H, W), got shape "
                             f"{tuple(rgb_feats.shape)}")
        if pose_feats.dim() == 5:
            n, _, t, h, w = rgb_feats.shape
            pn, _, pt, ph, pw = pose_feats.shape
            strided = -(-pt // t_stride)
            if (pn, strided, ph, pw) != (n, t, h, w):
                raise ValueError(
                    f"SpatialTemporalAttention: pose_feats {tuple(pose_feats.shape)} do not match rgb_feats "
                    f"{tuple(rgb_feats.shape)}: expected the same N, H, W and ceil(T_pose / t_stride) = "
                    f"ceil({pt} / {t_stride}) = {strided} equal to the RGB frames T = {t}")
        spatial, temporal = self.maps(pose_feats, t_stride)
        reweight = attention_reweight if self.fused else attention_reweight_reference
        return reweight(rgb_feats, spatial, temporal), spatial, temporal

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, t_stride={self.t_stride}, fused={self.fused}"
