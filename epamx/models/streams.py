"""The single-stream models of the authors' two-stage protocol, and one way to build and call any of the three.

Each stream is first trained alone (``RGBStream``, ``PoseStream``), then EPAM-Net is initialised from both and
fine-tuned (docs/epamnet.md, "Training protocol"). The three stages are named "pose", "rgb" and "epamnet". The streams name their submodules exactly as
:class:`EPAMNet` does (``rgb_backbone``, ``rgb_cls_head``, ``pose_backbone``, ``pose_cls_head``), so their state
dicts are subsets of EPAM-Net's and :func:`init_from` can move weights between all three.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from epamx.distributed import unwrap
from epamx.errors import CheckpointError
from epamx.models.checkpoint import read_checkpoint
from epamx.models.epamnet import ClassificationHead, EPAMNet
from epamx.models.memory_format import MemoryFormatPolicy
from epamx.models.xshiftnet import XShiftNet

__all__ = ["MODES", "PoseStream", "RGBStream", "build_model", "init_from", "model_mode", "modalities",
           "stream_logits"]

MODES = ("rgb", "pose", "epamnet")
# The parts a model of each mode is made of (state-dict key prefixes).
_PARTS = {
    "rgb": ("rgb_backbone", "rgb_cls_head"),
    "pose": ("pose_backbone", "pose_cls_head"),
    "epamnet": ("rgb_backbone", "rgb_cls_head", "pose_backbone", "pose_cls_head", "attention_module"),
}


def _check_num_classes(name: str, num_classes: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"{name}: num_classes must be an int >= 1, got {num_classes!r}")


class RGBStream(nn.Module):
    """EPAM-Net's RGB stream alone: X-ShiftNet (RGB) -> classification head. ``forward(imgs (N, 3, T, H, W))``
    returns logits (N, num_classes). ``memory_format`` as for :class:`EPAMNet` ("auto": channels_last_3d on CPU)."""

    def __init__(self, num_classes: int, dropout: float = 0.5, fused: bool = True, memory_format: str = "auto"):
        super().__init__()
        _check_num_classes("RGBStream", num_classes)
        self.num_classes = num_classes
        self.rgb_backbone = XShiftNet.rgb(fused=fused)
        self.rgb_cls_head = ClassificationHead(self.rgb_backbone.feat_dim, num_classes, dropout)
        self.memory_format = memory_format

    @property
    def fused(self) -> bool:
        return self.rgb_backbone.fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self.rgb_backbone.fused = bool(value)

    @property
    def memory_format(self) -> str:
        return self._memory_format.value

    @memory_format.setter
    def memory_format(self, value: str) -> None:
        self._memory_format = MemoryFormatPolicy(value, "RGBStream")

    def forward(self, imgs: Tensor) -> Tensor:
        (imgs,) = self._memory_format.prepare(self, imgs)
        return self.rgb_cls_head(self.rgb_backbone(imgs))


class PoseStream(nn.Module):
    """EPAM-Net's pose stream alone: X-ShiftNet (pose) -> classification head. ``forward(heatmaps (N, K, T, h, w))``
    returns logits (N, num_classes). ``memory_format`` as for :class:`EPAMNet` ("auto": channels_last_3d on CPU)."""

    def __init__(self, num_classes: int, pose_channels: int = 17, dropout: float = 0.5, fused: bool = True,
                 memory_format: str = "auto"):
        super().__init__()
        _check_num_classes("PoseStream", num_classes)
        self.num_classes = num_classes
        self.pose_backbone = XShiftNet.pose(in_channels=pose_channels, fused=fused)
        self.pose_cls_head = ClassificationHead(self.pose_backbone.feat_dim, num_classes, dropout)
        self.memory_format = memory_format

    @property
    def fused(self) -> bool:
        return self.pose_backbone.fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self.pose_backbone.fused = bool(value)

    @property
    def memory_format(self) -> str:
        return self._memory_format.value

    @memory_format.setter
    def memory_format(self, value: str) -> None:
        self._memory_format = MemoryFormatPolicy(value, "PoseStream")

    def forward(self, heatmaps: Tensor) -> Tensor:
        (heatmaps,) = self._memory_format.prepare(self, heatmaps)
        return self.pose_cls_head(self.pose_backbone(heatmaps))


def build_model(mode: str, num_classes: int, pose_channels: int = 17, fused: bool = True,
                dropout: float = 0.5) -> nn.Module:
    """The model a training stage of ``mode`` trains: "rgb" -> RGBStream, "pose" -> PoseStream, "epamnet" ->
    EPAMNet. ``fused`` selects the fused epamx ops (True) or the plain-PyTorch reference path (False)."""
    if mode == "rgb":
        return RGBStream(num_classes, dropout=dropout, fused=fused)
    if mode == "pose":
        return PoseStream(num_classes, pose_channels, dropout=dropout, fused=fused)
    if mode == "epamnet":
        return EPAMNet(num_classes, pose_channels=pose_channels, fused=fused, dropout=dropout)
    raise ValueError(f"build_model: mode must be one of {', '.join(MODES)}, got {mode!r}")


def model_mode(model: nn.Module) -> str:
    """"rgb", "pose" or "epamnet" for an RGBStream, PoseStream or EPAMNet (possibly wrapped in DDP)."""
    inner = unwrap(model)
    if isinstance(inner, EPAMNet):
        return "epamnet"
    if isinstance(inner, RGBStream):
        return "rgb"
    if isinstance(inner, PoseStream):
        return "pose"
    raise TypeError(f"expected an RGBStream, PoseStream or EPAMNet, got {type(inner).__name__}")


def modalities(mode: str) -> Tuple[str, ...]:
    """The inputs a stage of ``mode`` reads: ("rgb",), ("pose",) or ("rgb", "pose")."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return {"rgb": ("rgb",), "pose": ("pose",), "epamnet": ("rgb", "pose")}[mode]


def stream_logits(model: nn.Module, imgs: Optional[Tensor], heatmaps: Optional[Tensor]) -> Dict[str, Tensor]:
    """Logits of every stream the model has: {'rgb': (N, C)}, {'pose': (N, C)} or both (EPAM-Net).

    ``model`` may be wrapped in DistributedDataParallel; it is called through the wrapper (DDP needs that).
    The input a model does not use may be None.
    """
    mode = model_mode(model)
    if mode == "epamnet":
        rgb, pose = model(imgs, heatmaps)
        return {"rgb": rgb, "pose": pose}
    if mode == "rgb":
        return {"rgb": model(imgs)}
    return {"pose": model(heatmaps)}


# ---- initialising from checkpoints -----------------------------------------------------------------------------

def _describe_mismatch(key: str, have: torch.Size, want: torch.Size) -> str:
    if key.endswith("cls_head.fc_cls.weight") or key.endswith("cls_head.fc_cls.bias"):
        return f"checkpoint has {have[0]} classes, model {want[0]}"
    if key.startswith("pose_backbone.conv1_s.conv.weight"):
        return f"checkpoint's pose stream takes {have[1]} heatmap channels, model {want[1]} (model.pose_channels)"
    return f"{key}: checkpoint shape {tuple(have)}, model {tuple(want)}"


def init_from(model: nn.Module, checkpoints: Union[str, os.PathLike, Sequence[Union[str, os.PathLike, Mapping]]],
              ) -> Dict[str, List[str]]:
    """Initialise the parts of ``model`` (an RGBStream, PoseStream or EPAMNet, maybe DDP-wrapped) that each
    checkpoint holds: the stage checkpoints of the two-stage protocol (an RGB stream's and a pose stream's for the
    fused model), an epamx EPAM-Net checkpoint, or one saved by the authors' code.

    A part (``rgb_backbone``, ``rgb_cls_head``, ``pose_backbone``, ``pose_cls_head``, ``attention_module``) is
    loaded from a checkpoint holding any of it, strictly; later checkpoints override earlier ones, and a checkpoint
    holding none of the model's parts is passed over (an RGB stream's, when training the pose stream), unless no
    checkpoint holds any. Files are read by :func:`epamx.models.checkpoint.read_checkpoint`. Raises
    CheckpointError naming the file when a part's shapes differ (e.g. "checkpoint has 60 classes, model 120") or
    keys are missing or unexpected. Returns {checkpoint: [parts loaded]}.
    """
    if isinstance(checkpoints, (str, os.PathLike, Mapping)):
        checkpoints = [checkpoints]
    inner = unwrap(model)
    parts = _PARTS[model_mode(inner)]
    own = inner.state_dict()
    loaded: Dict[str, List[str]] = {}
    found = set()
    for source in checkpoints:
        checkpoint = read_checkpoint(source)
        name, state = checkpoint.source, checkpoint.state_dict()
        taken = []
        for part in parts:
            prefix = part + "."
            want = {k: v for k, v in own.items() if k.startswith(prefix)}
            have = {k: v for k, v in state.items() if k.startswith(prefix)}
            if not have:
                continue
            missing = sorted(set(want) - set(have))
            unexpected = sorted(set(have) - set(want))
            if missing or unexpected:
                raise CheckpointError(f"{name}: its {part} differs from the model's: "
                                 f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                                 f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
            for key, value in have.items():
                if value.shape != want[key].shape:
                    raise CheckpointError(f"{name}: {_describe_mismatch(key, value.shape, want[key].shape)}")
            getattr(inner, part).load_state_dict({k[len(prefix):]: v for k, v in have.items()}, strict=True)
            taken.append(part)
        loaded[name] = taken
        found.update(k.split(".", 1)[0] for k in state)
    if loaded and not any(loaded.values()):
        raise CheckpointError(f"{', '.join(loaded)}: {'holds' if len(loaded) == 1 else 'hold'} none of the parts of this "
                         f"{model_mode(inner)} model ({', '.join(parts)}); found {', '.join(sorted(found)) or 'nothing'}")
    return loaded

