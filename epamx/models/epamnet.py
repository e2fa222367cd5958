"""EPAM-Net: RGB and pose X-ShiftNet streams, pose-driven spatial-temporal attention on the RGB features, two
classification heads whose logits are summed (docs/epamnet.md describes the model)."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from epamx.models.memory_format import MemoryFormatPolicy
from epamx.models.xshiftnet import FUSED_MODULES, XShiftNet
from epamx.nn import PoseHeatmaps, SpatialTemporalAttention


class ClassificationHead(nn.Module):
    """Global average pool -> dropout -> linear (the authors' I3DHead, weights ~ N(0, init_std), bias 0)."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.5, init_std: float = 0.01):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc_cls = nn.Linear(in_channels, num_classes)
        nn.init.normal_(self.fc_cls.weight, std=init_std)
        nn.init.zeros_(self.fc_cls.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_cls(self.dropout(x.mean(dim=(2, 3, 4))))


class EPAMNet(nn.Module):
    """The efficient pose-driven attention-guided multimodal network.

    Args:
        num_classes: action classes (60 for NTU-60: 2,538,717 parameters; 120 for NTU-120: 2,577,717).
        pose_channels: heatmap channels (17 COCO joints; more with limbs or other skeletons).
        fused: run on the fused epamx ops (default), or False for the plain-PyTorch reference path.
        dropout: of both heads.
        heatmap_size: the size raw keypoints are rendered at by ``forward_keypoints`` (56).
        memory_format: the memory format the model computes in: "auto" (default: channels_last_3d on CPU,
            contiguous on CUDA; why: docs/performance.md, Memory formats), "channels_last_3d", "contiguous", or
            "preserve" (whatever the inputs and weights come in). ``forward`` converts the inputs, and the
            weights once; the logits do not depend on it beyond float rounding. Other values raise ValueError.

    ``forward(imgs (N, 3, T, H, W), heatmaps (N, K, T_p, h, w))`` returns ``(rgb_logits, pose_logits)``;
    T_p must be a multiple of T (48 pose frames for 16 RGB frames) and both streams must end at the same
    spatial size (224x224 RGB and 56x56 heatmaps both give 7x7). ``predict`` sums the logits.
    ``forward_keypoints`` takes raw keypoints instead of heatmaps and renders them on the device
    (``pose_renderer``, an :class:`epamx.nn.PoseHeatmaps` set as the authors' pipeline: crop to the persons' box
    clipped to the image, resize, optional flip, render with eps 1e-4), as epamx.data.BatchTransform does.

    For inference only, :func:`epamx.models.optimize_for_inference` returns a faster copy with batch norm folded
    into the convolutions.
    """

    def __init__(self, num_classes: int, pose_channels: int = 17, fused: bool = True, dropout: float = 0.5,
                 heatmap_size: int = 56, memory_format: str = "auto"):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"EPAMNet: num_classes must be an int >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.rgb_backbone = XShiftNet.rgb()
        self.pose_backbone = XShiftNet.pose(in_channels=pose_channels)
        self.attention_module = SpatialTemporalAttention(kernel_size=7, t_stride=3)
        self.rgb_cls_head = ClassificationHead(self.rgb_backbone.feat_dim, num_classes, dropout)
        self.pose_cls_head = ClassificationHead(self.pose_backbone.feat_dim, num_classes, dropout)
        # the authors' MMCompact: the persons' box is clipped to the image (allow_imgpad=False)
        self.pose_renderer = PoseHeatmaps(size=heatmap_size, allow_imgpad=False)
        self.fused = fused
        self.memory_format = memory_format

    @property
    def memory_format(self) -> str:
        return self._memory_format.value

    @memory_format.setter
    def memory_format(self, value: str) -> None:
        self._memory_format = MemoryFormatPolicy(value, "EPAMNet")

    @property
    def fused(self) -> bool:
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused = bool(value)
        for m in self.modules():
            if isinstance(m, (*FUSED_MODULES, SpatialTemporalAttention)):
                m.fused = self._fused

    def _backbone_features(self, imgs: Tensor, heatmaps: Tensor) -> Tuple[Tensor, Tensor, int]:
        """Both backbones' features and the pose frames per RGB frame, after checking the inputs."""
        if imgs.dim() != 5 or heatmaps.dim() != 5 or imgs.shape[0] != heatmaps.shape[0]:
            raise ValueError(f"EPAMNet: expected imgs (N, 3, T, H, W) and heatmaps (N, K, T_p, h, w) with the same N, "
                             f"got {tuple(imgs.shape)} and {tuple(heatmaps.shape)}")
        frames, pose_frames = imgs.shape[2], heatmaps.shape[2]
        if frames < 1 or pose_frames % frames:
            raise ValueError(f"EPAMNet: the pose frames T_p = {pose_frames} must be a multiple of the RGB frames "
                             f"T = {frames} (EPAM-Net: 48 and 16)")
        imgs, heatmaps = self._memory_format.prepare(self, imgs, heatmaps)
        rgb = self.rgb_backbone(imgs)
        pose = self.pose_backbone(heatmaps)
        if rgb.shape[3:] != pose.shape[3:]:
            raise ValueError(f"EPAMNet: the streams end at different sizes, RGB {tuple(rgb.shape[3:])} from "
                             f"{tuple(imgs.shape[3:])} and pose {tuple(pose.shape[3:])} from {tuple(heatmaps.shape[3:])}; "
                             f"RGB frames must be 4x the heatmap size (224x224 with 56x56)")
        return rgb, pose, pose_frames // frames

    def features(self, imgs: Tensor, heatmaps: Tensor) -> Tuple[Tensor, Tensor]:
        """Attended RGB features (N, 432, T, 7, 7) and pose features (N, 216, T_p, 7, 7)."""
        rgb, pose, stride = self._backbone_features(imgs, heatmaps)
        return self.attention_module(rgb, pose, t_stride=stride), pose

    def forward_with_attention(self, imgs: Tensor, heatmaps: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``forward``'s (rgb_logits, pose_logits) and the attention the pose features drove: the spatial map S
        (N, 1, T, 7, 7) and the temporal weights A (N, 1, T, 1, 1), from one pass."""
        rgb, pose, stride = self._backbone_features(imgs, heatmaps)
        attended, spatial, temporal = self.attention_module.forward_with_maps(rgb, pose, t_stride=stride)
        return self.rgb_cls_head(attended), self.pose_cls_head(pose), spatial, temporal

    def forward(self, imgs: Tensor, heatmaps: Tensor) -> Tuple[Tensor, Tensor]:
        rgb, pose = self.features(imgs, heatmaps)
        return self.rgb_cls_head(rgb), self.pose_cls_head(pose)

    def forward_keypoints(self, imgs: Tensor, keypoints: Tensor, scores: Optional[Tensor] = None,
                          img_shape: Union[Tensor, Tuple[int, int], None] = None,
                          flip: Union[bool, Tensor, None] = None) -> Tuple[Tensor, Tensor]:
        """Like ``forward``, from raw keypoints (N, M, T_p, V, 2) in image pixels, scores (N, M, T_p, V) or None,
        and the images' (h, w) (one pair, or (N, 2)); ``flip`` mirrors the keypoints as flipped frames would be."""
        return self(imgs, self.pose_renderer(keypoints, scores, img_shape, flip))

    @torch.no_grad()
    def predict(self, imgs: Tensor, heatmaps: Tensor) -> Tensor:
        """Fused class scores: RGB logits + pose logits (equal weights), (N, num_classes)."""
        rgb_logits, pose_logits = self(imgs, heatmaps)
        return rgb_logits + pose_logits
