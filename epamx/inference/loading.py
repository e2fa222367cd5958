"""Trained models back from disk: a checkpoint or a run folder -> the model, its description and its config."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from epamx.config import Config, load_config, override
from epamx.distributed import init_distributed
from epamx.errors import CheckpointError, CheckpointNotFound
from epamx.models import build_model, optimize_for_inference, read_checkpoint

__all__ = ["LoadedModel", "config_for_checkpoint", "find_run_file", "inference_model", "load", "load_model",
           "memory_format_name", "resolve_channels_last", "resolve_checkpoint"]

# Where a run folder keeps each stage's final weights, the EPAM-Net stage first ("fused/": its name before it had
# one of its own).
_FINAL_CANDIDATES = ("final.pt", "epamnet/final.pt", "fused/final.pt", "rgb/final.pt", "pose/final.pt")


def find_run_file(checkpoint: Union[str, os.PathLike], name: str = "config.toml") -> Optional[Path]:
    """``name`` in the checkpoint's folder or the folders above it (a stage folder, then its run folder)."""
    folder = Path(checkpoint).resolve().parent
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / name).is_file():
            return candidate / name
    return None


def resolve_checkpoint(path: Union[str, os.PathLike]) -> Path:
    """A checkpoint file, or a run/stage folder: its final.pt (a run folder: the EPAM-Net stage's, else the last
    stage's that has one)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointNotFound(f"checkpoint {path} does not exist")
    for candidate in _FINAL_CANDIDATES:
        if (path / candidate).is_file():
            return path / candidate
    raise CheckpointNotFound(f"{path} holds no final.pt (nor epamnet/, rgb/ or pose/final.pt): pass a checkpoint "
                             f"file")


def config_for_checkpoint(checkpoint: Union[str, os.PathLike], config: Optional[str] = None,
                          overrides: Sequence[str] = ()) -> Config:
    """The config a checkpoint was trained with (its run's config.toml), or ``config``, plus ``overrides``."""
    if config is None:
        found = find_run_file(checkpoint)
        config = str(found) if found is not None else "embedded"
    return load_config(config, overrides)


def load_model(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu", fused: bool = True,
               dropout: float = 0.5):
    """The model an epamx checkpoint (final.pt or any training checkpoint) holds, in eval mode, and its ``meta``
    (mode, num_classes, pose_channels, class_names)."""
    checkpoint = read_checkpoint(path).require_epamx()
    meta = checkpoint.meta
    if "mode" not in meta:
        raise CheckpointError(f"{path}: has no model description ('meta')")
    model = build_model(meta["mode"], meta["num_classes"], meta["pose_channels"], fused, dropout)
    model.load_state_dict(checkpoint.state_dict())
    return model.to(device).eval(), meta


def resolve_channels_last(value: Union[bool, str], device: torch.device) -> bool:
    """``model.channels_last`` (True, False or "auto": on for CPU) on ``device``."""
    return device.type == "cpu" if value == "auto" else bool(value)


def memory_format_name(channels_last: bool) -> str:
    return "channels_last_3d" if channels_last else "contiguous"


def inference_model(model: nn.Module, channels_last: Union[bool, str], device: torch.device,
                    dtype: str = "float32") -> nn.Module:
    """``optimize_for_inference(model)`` in the memory format ``channels_last`` (True, False or "auto") asks for
    on ``device``, computing in ``dtype`` ("float32" or "bfloat16"): what evaluation and prediction run."""
    return optimize_for_inference(model, memory_format_name(resolve_channels_last(channels_last, device)), dtype)


@dataclass
class LoadedModel:
    """A trained model ready to use, and what it came with."""
    checkpoint: Path
    config: Config
    device: torch.device
    model: nn.Module                # in eval mode, on ``device``, not optimised (render needs its modules)
    meta: Dict[str, Any]

    @property
    def mode(self) -> str:
        return self.meta["mode"]

    @property
    def class_names(self) -> List[str]:
        return list(self.meta.get("class_names") or [f"class_{i}" for i in range(self.meta["num_classes"])])

    def optimized(self) -> nn.Module:
        """:func:`inference_model` of the model, for prediction and evaluation."""
        return inference_model(self.model, self.config.model.channels_last, self.device,
                               self.config.model.inference_dtype)


def load(checkpoint: Union[str, os.PathLike] = "runs/embedded", config: Optional[str] = None,
         overrides: Sequence[str] = (), device: Optional[str] = None) -> LoadedModel:
    """A checkpoint or run folder's model, with its run's config (or ``config``) plus ``overrides``, on ``device``
    (default: the config's train.device)."""
    path = resolve_checkpoint(checkpoint)
    overrides = list(overrides) + ([override("train.device", device)] if device else [])
    cfg = config_for_checkpoint(path, config, overrides)
    resolved = init_distributed(cfg.train.device).device
    model, meta = load_model(path, resolved, cfg.model.fused)
    return LoadedModel(path, cfg, resolved, model, meta)

