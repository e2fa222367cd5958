"""Reading checkpoints: one reader for every kind epamx meets.

- epamx's own files (``format`` "epamx-checkpoint-1"): a training state (model, optimiser, schedule, RNG states)
  or a stage's final weights; both carry ``meta`` (mode, num_classes, pose_channels, class_names) and ``model``;
- the authors' files (github.com/ahmed-nady/Multimodal-Action-Recognition): ``{'epoch', 'model_state_dict',
  'optimizer_state_dict'}`` (keys prefixed ``module.`` under DDP), or mmaction-style ``{'state_dict': ...}``;
- a bare state dict.

Files are read with ``torch.load(weights_only=True)``: a pickle that would build anything but tensors and plain
containers is refused before it can run code. Every error is a :class:`epamx.errors.CheckpointError` naming the
file (:class:`~epamx.errors.CheckpointNotFound` for a missing one).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import IO, Any, Dict, Mapping, Union

import torch
from torch import Tensor, nn

from epamx.errors import CheckpointError, CheckpointNotFound

__all__ = ["FORMAT", "Checkpoint", "convert_authors_state_dict", "load_authors_checkpoint", "read_checkpoint"]

FORMAT = "epamx-checkpoint-1"
Source = Union[str, os.PathLike, IO[bytes], Mapping]

# The authors' names for the attention block -> ours. Backbones and heads already share their names.
_RENAMES = [
    (re.compile(r"^attention_module\.spatial\.conv\."), "attention_module.spatial_conv."),
    (re.compile(r"^attention_module\.spatial\.bn\."), "attention_module.spatial_bn."),
    (re.compile(r"^attention_module\.conv_temporal_attention\."), "attention_module.temporal_conv."),
]
# The EPAM-Net stage was called "fused" before it had a name of its own; such checkpoints read as "epamnet".
_MODE_ALIASES = {"fused": "epamnet"}


def convert_authors_state_dict(state: Mapping[str, Tensor]) -> dict:
    """The authors' state dict (with or without DDP's ``module.`` prefix) under epamx's names."""
    converted = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        for pattern, replacement in _RENAMES:
            key = pattern.sub(replacement, key)
        converted[key] = value
    return converted


@dataclass
class Checkpoint:
    """A checkpoint as read: ``kind`` is "epamx", "authors" or "state_dict"; ``data`` the loaded dict."""
    source: str
    kind: str
    data: Dict[str, Any]

    @property
    def meta(self) -> Dict[str, Any]:
        """epamx's model description (mode, num_classes, pose_channels, class_names); {} for other kinds."""
        meta = dict(self.data.get("meta") or {}) if self.kind == "epamx" else {}
        if "mode" in meta:
            meta["mode"] = _MODE_ALIASES.get(meta["mode"], meta["mode"])
        return meta

    @property
    def is_training_state(self) -> bool:
        """An epamx training checkpoint that a stage can resume from (optimiser, schedule and RNG states)."""
        return self.kind == "epamx" and "optimizer" in self.data

    def state_dict(self) -> Dict[str, Tensor]:
        """The model's state dict under epamx's names."""
        if self.kind == "epamx":
            state = self.data.get("model")
        elif self.kind == "authors":
            state = next(self.data[k] for k in ("model_state_dict", "state_dict") if isinstance(self.data.get(k),
                                                                                                 Mapping))
        else:
            state = self.data
        if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                     for k, v in state.items()):
            raise CheckpointError(f"{self.source}: holds no model state dict (a dict of tensors)")
        return convert_authors_state_dict(state)

    def require_epamx(self) -> "Checkpoint":
        """This checkpoint, if epamx wrote it; else a CheckpointError that says what to do instead."""
        if self.kind != "epamx":
            what = "the authors' format" if self.kind == "authors" else "a bare state dict"
            raise CheckpointError(f"{self.source}: not an epamx training checkpoint ({what}, not {FORMAT!r}); to "
                                  f"start from another model's weights use train.init_from")
        return self


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if not (hasattr(source, "read") and hasattr(source, "seek")):
        raise TypeError(f"read_checkpoint: expected a path, a binary file object or a state dict, got "
                        f"{type(source).__name__}")
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else f"the checkpoint in the {type(source).__name__} passed in"


def read_checkpoint(source: Source, map_location: Union[str, torch.device] = "cpu") -> Checkpoint:
    """Read a checkpoint of any kind epamx knows (see the module docstring) from a path, a binary file object
    or an already loaded dict."""
    if isinstance(source, Mapping):
        data, name = source, "<state dict>"
    else:
        name = _describe(source)
        if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
            raise CheckpointNotFound(f"no such checkpoint: {name}")
        try:
            data = torch.load(source, map_location=map_location, weights_only=True)
        except Exception as exc:  # UnpicklingError for disallowed objects, RuntimeError/EOFError for torn files
            raise CheckpointError(f"{name}: cannot be read as a weights-only checkpoint; epamx never unpickles "
                                  f"objects other than tensors and plain containers ({type(exc).__name__}: "
                                  f"{_first_line(exc)})") from exc
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{name}: holds a {type(data).__name__}, expected a checkpoint dict or a state dict")
    if data.get("format") == FORMAT:
        kind = "epamx"
    elif any(isinstance(data.get(k), Mapping) for k in ("model_state_dict", "state_dict")):
        kind = "authors"
    elif data and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()):
        kind = "state_dict"
    else:
        keys = sorted(map(str, data))[:8]
        raise CheckpointError(f"{name}: not a checkpoint epamx knows (format {data.get('format')!r}; keys {keys}): "
                              f"expected an epamx checkpoint, the authors' ('model_state_dict' or 'state_dict') or a "
                              f"state dict of tensors")
    return Checkpoint(name, kind, dict(data))


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def load_authors_checkpoint(model: nn.Module, path_or_state_dict: Source) -> nn.Module:
    """Load a checkpoint of the authors' EPAM-Net (or any checkpoint :func:`read_checkpoint` reads) into ``model``
    (an epamx EPAMNet), strictly. A CheckpointError names the checkpoint when it cannot be read or does not fit
    the model: for another number of classes it says how many each has, otherwise the keys or shapes that differ."""
    checkpoint = read_checkpoint(path_or_state_dict)
    state = checkpoint.state_dict()
    _check_shapes(model, state, checkpoint.source)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint.source}: does not fit the model: {exc}") from exc
    return model


def _check_shapes(model: nn.Module, state: Mapping, source: str) -> None:
    """Shape mismatches, explained before load_state_dict's bare "size mismatch" lines: a classification head
    sized for another class count is the common case (an NTU-60 checkpoint for an NTU-120 model)."""
    own = model.state_dict()
    mismatched = [key for key, value in state.items() if key in own and value.shape != own[key].shape]
    if not mismatched:
        return
    heads = [key for key in mismatched if key.endswith("fc_cls.weight") and state[key].dim() == 2]
    if heads:
        key = heads[0]
        raise CheckpointError(f"{source}: has {state[key].shape[0]} classes, the model {own[key].shape[0]} ({key} is "
                              f"{tuple(state[key].shape)} in the checkpoint, {tuple(own[key].shape)} in the model); "
                              f"build the model with num_classes={state[key].shape[0]}")
    details = "; ".join(f"{key}: {tuple(state[key].shape)} in the checkpoint, {tuple(own[key].shape)} in the model"
                        for key in mismatched)
    raise CheckpointError(f"{source}: does not fit the model, shapes differ: {details}")
