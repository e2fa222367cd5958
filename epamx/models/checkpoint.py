"""Loading checkpoints saved by the authors' code (github.com/ahmed-nady/Multimodal-Action-Recognition)."""
from __future__ import annotations

import os
import re
from typing import IO, Mapping, Union

import torch
from torch import Tensor, nn

# The authors' names for the attention block -> ours. Backbones and heads already share their names.
_RENAMES = [
    (re.compile(r"^attention_module\.spatial\.conv\."), "attention_module.spatial_conv."),
    (re.compile(r"^attention_module\.spatial\.bn\."), "attention_module.spatial_bn."),
    (re.compile(r"^attention_module\.conv_temporal_attention\."), "attention_module.temporal_conv."),
]


def convert_authors_state_dict(state: Mapping[str, Tensor]) -> dict:
    """The authors' state dict (with or without DDP's ``module.`` prefix) under epamx's names."""
    converted = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        for pattern, replacement in _RENAMES:
            key = pattern.sub(replacement, key)
        converted[key] = value
    return converted


def load_authors_checkpoint(model: nn.Module,
                            path_or_state_dict: Union[str, os.PathLike, IO[bytes], Mapping]) -> nn.Module:
    """Load a checkpoint of the authors' EPAM-Net into ``model`` (an epamx EPAMNet), strictly.

    Accepts what ``torch.load`` accepts (a path or a binary file object, read weights-only: a pickle that would
    build anything but tensors and plain containers is refused, never run) or an already loaded dict. The
    authors' trainer saves {'epoch', 'model_state_dict', 'optimizer_state_dict'} (keys prefixed ``module.`` under
    DDP); mmaction-style files hold 'state_dict'; a bare state dict works too. Errors name the checkpoint: a file
    that cannot be read as a weights-only checkpoint raises a RuntimeError, and so does a checkpoint that does not
    fit the model: for another number of classes it says how many each has, otherwise it lists the missing and
    unexpected keys or the shapes that differ.
    """
    if isinstance(path_or_state_dict, Mapping):
        checkpoint, source = path_or_state_dict, "the state dict passed in"
    else:
        source = _describe_source(path_or_state_dict)
        try:
            checkpoint = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
        except Exception as exc:
            if isinstance(exc, OSError) and exc.filename is not None:
                raise  # a missing or unreadable file, which the message names
            raise RuntimeError(f"load_authors_checkpoint: could not read {source}: it is not a weights-only "
                               f"PyTorch checkpoint (corrupt, not a checkpoint at all, or holding pickled objects "
                               f"other than tensors and plain containers, which are never unpickled). torch.load "
                               f"said: {exc}") from exc
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"load_authors_checkpoint: {source} holds a {type(checkpoint).__name__}, expected a state "
                        f"dict or a checkpoint dict")
    for wrapper in ("model_state_dict", "state_dict"):
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
            checkpoint = checkpoint[wrapper]
            break
    state = convert_authors_state_dict(checkpoint)
    _check_shapes(model, state, source)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RuntimeError(f"load_authors_checkpoint: {source} does not fit the model: {exc}") from exc
    return model


def _describe_source(f) -> str:
    if isinstance(f, (str, os.PathLike)):
        return f"checkpoint '{os.fspath(f)}'"
    if not (hasattr(f, "read") and hasattr(f, "seek")):
        raise TypeError(f"load_authors_checkpoint: expected a path, a binary file object or a state dict, got "
                        f"{type(f).__name__}")
    name = getattr(f, "name", None)
    return f"checkpoint '{name}'" if isinstance(name, str) else f"the checkpoint in the {type(f).__name__} passed in"


def _check_shapes(model: nn.Module, state: Mapping, source: str) -> None:
    """Shape mismatches, explained before load_state_dict's bare "size mismatch" lines: a classification head
    sized for another class count is the common case (an NTU-60 checkpoint for an NTU-120 model)."""
    own = model.state_dict()
    mismatched = [key for key, value in state.items()
                  if key in own and isinstance(value, Tensor) and value.shape != own[key].shape]
    if not mismatched:
        return
    heads = [key for key in mismatched if key.endswith("fc_cls.weight") and state[key].dim() == 2]
    if heads:
        key = heads[0]
        raise RuntimeError(f"load_authors_checkpoint: {source} has {state[key].shape[0]} classes, the model "
                           f"{own[key].shape[0]} ({key} is {tuple(state[key].shape)} in the checkpoint, "
                           f"{tuple(own[key].shape)} in the model); build the model with "
                           f"num_classes={state[key].shape[0]}")
    details = "; ".join(f"{key}: {tuple(state[key].shape)} in the checkpoint, {tuple(own[key].shape)} in the model"
                        for key in mismatched)
    raise RuntimeError(f"load_authors_checkpoint: {source} does not fit the model, shapes differ: {details}")
