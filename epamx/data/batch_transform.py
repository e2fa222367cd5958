"""The device side of the input pipeline: a collated batch of uint8 frames and raw keypoints -> the model's inputs.

Runs batched on the training device (GPU or CPU): horizontal flip of the frames (per clip), ImageNet mean/std
normalisation, and the pose stream's crop -> rescale -> flip -> heatmap rendering (epamx.nn.PoseHeatmaps with
the authors' MMCompact settings: padding 0.25, square, clipped to the image; GeneratePoseTarget: sigma 0.6,
eps 1e-4, joints only). The pose-only pipeline's keypoints arrive cropped (by the workers): only flip and render.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from epamx.data.config import DataConfig
from epamx.data.pipelines import get_pipeline
from epamx.errors import DataError
from epamx.nn import PoseHeatmaps
from epamx.ops import COCO17_FLIP_PAIRS, NTU25_FLIP_PAIRS

__all__ = ["BatchTransform", "IMAGENET_MEAN", "IMAGENET_STD", "SKELETONS"]

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
# joint count (None: any) and the left/right pairs a flip swaps
SKELETONS = {"coco17": (17, COCO17_FLIP_PAIRS), "ntu25": (25, NTU25_FLIP_PAIRS), "any": (None, ())}


class BatchTransform(nn.Module):
    """``transform(batch, device, channels_last) -> (imgs, heatmaps, labels)``.

    imgs: float32 (N, 3, T, H, W) normalised RGB, flipped where ``batch['flip']`` (None without 'imgs');
    heatmaps: float32 (N, K, T_p, h, w) rendered from the keypoints (None if ``"pose"`` is not in modalities);
    labels: int64 (N,). With ``channels_last`` both come in channels_last_3d memory.

    ``pipeline`` (epamx.data.pipelines) is the one the clips were read through. ``cfg.skeleton`` names the joint
    layout: "coco17", "ntu25", or "any" (any joint count; a flip then mirrors the
    coordinates without swapping left and right joints, so set ``flip_prob = 0`` unless the skeleton is symmetric).
    An unknown skeleton, or keypoints with another joint count, raise DataError.
    """

    def __init__(self, cfg: DataConfig, modalities: Sequence[str] = ("rgb", "pose"), pipeline: str = "multimodal"):
        super().__init__()
        if cfg.skeleton not in SKELETONS:
            raise DataError(f"data.skeleton must be one of {sorted(SKELETONS)}, got {cfg.skeleton!r}")
        self.modalities = tuple(modalities)
        self.pipeline = get_pipeline(pipeline)
        self.num_joints, flip_pairs = SKELETONS[cfg.skeleton]
        # multimodal: MMCompact here; pose_only: the workers cropped the keypoints to the heatmap grid already
        self.heatmaps = PoseHeatmaps(size=cfg.heatmap_size, sigma=cfg.sigma, eps=cfg.eps, padding=0.25,
                                     threshold=10, hw_ratio=1.0, allow_imgpad=False, flip_pairs=flip_pairs,
                                     crop=self.pipeline.pose_crop != "posec3d", flip_rule=cfg.keypoint_flip)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1), persistent=False)

    def forward(self, batch: Dict[str, Any], device: torch.device,
                channels_last: bool = False) -> Tuple[Optional[Tensor], Optional[Tensor], Tensor]:
        labels = batch["label"].to(device, non_blocking=True)
        flip = batch["flip"].to(device, non_blocking=True)
        imgs = heatmaps = None
        if "rgb" in self.modalities:
            frames = batch["imgs"].to(device, non_blocking=True)             # (N, T, H, W, 3) uint8
            frames = torch.where(flip.view(-1, 1, 1, 1, 1), frames.flip(3), frames)
            x = frames.permute(0, 4, 1, 2, 3).float()                        # (N, 3, T, H, W), channels-last strides
            mean, std = self.mean.to(device), self.std.to(device)
            imgs = (x - mean) / std
            imgs = imgs.contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
        if "pose" in self.modalities:
            kp = batch["keypoint"].to(device, non_blocking=True)
            if self.num_joints is not None and kp.shape[-2] != self.num_joints:
                raise DataError(f"BatchTransform: the keypoints have {kp.shape[-2]} joints but data.skeleton is "
                                f"{self.num_joints}-joint (clips {list(batch.get('frame_dir', []))[:3]}); set "
                                f"data.skeleton to match the annotations")
            scores = batch["keypoint_score"].to(device, non_blocking=True)
            img_shape = batch["img_shape"].to(device)
            heatmaps = self.heatmaps(kp, scores, img_shape, flip)
            if channels_last:
                heatmaps = heatmaps.contiguous(memory_format=torch.channels_last_3d)
        return imgs, heatmaps, labels
