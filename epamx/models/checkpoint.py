"""Loading checkpoints saved by the authors' code (github.com/ahmed-nady/Multimodal-Action-Recognition)."""
from __future__ import annotations

import os
import re
from typing import Mapping, Union

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


def load_authors_checkpoint(model: nn.Module, path_or_state_dict: Union[str, os.PathLike, Mapping]) -> nn.Module:
    """Load a checkpoint of the authors' EPAM-Net into ``model`` (an epamx EPAMNet), strictly.

    Accepts a path or an already loaded object: the authors' trainer saves {'epoch', 'model_state_dict',
    'optimizer_state_dict'} (keys prefixed ``module.`` under DDP); mmaction-style files hold 'state_dict'; a bare
    state dict works too. Raises a RuntimeError listing missing and unexpected keys if the architectures differ.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        checkpoint = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
    else:
        checkpoint = path_or_state_dict
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"load_authors_checkpoint: expected a state dict or a checkpoint dict, got {type(checkpoint)}")
    for wrapper in ("model_state_dict", "state_dict"):
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
            checkpoint = checkpoint[wrapper]
            break
    model.load_state_dict(convert_authors_state_dict(checkpoint), strict=True)
    return model
