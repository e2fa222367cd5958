"""A clip in channels-last memory, optionally cast to another floating dtype, in one pass on a CPU.

    to_channels_last(x, dtype) == x.to(dtype, memory_format=torch.channels_last_3d)    (channels_last for 4-D x)

bit for bit (casts round to nearest even, as ATen's). ATen's copy into a channels-last tensor walks the output with
the input's strides and ran 4-12x slower than a plain copy on EPAM-Net's clips (3 or 17 channels); this kernel
interleaves a 3-channel clip's planes straight from the input (casting after, in whole vectors) and for other
channel counts casts each channel's run of 256 positions into a staging block, then interleaves the block (1.8-8x
ATen's conversion on EPAM-Net's clips, docs/performance.md). The models convert their
inputs with it on a CPU (epamx.models' memory-format policy and optimize_for_inference's bfloat16 inputs). CPU
kernel only, no gradient: on other devices, for inputs that require a gradient and under torch.compile it is ATen's
conversion.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["to_channels_last", "to_channels_last_reference"]


def _format(x: Tensor) -> torch.memory_format:
    return torch.channels_last_3d if x.dim() == 5 else torch.channels_last


def to_channels_last(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """x (4-D or 5-D, floating) in channels-last memory and ``dtype`` (default: x's). A copy unless x is already
    both (then x itself, as ``Tensor.to`` returns)."""
    fmt = _format(x) if x.dim() in (4, 5) else None
    if fmt is not None and x.is_contiguous(memory_format=fmt) and (dtype is None or dtype == x.dtype):
        return x
    if (x.device.type != "cpu" or torch.compiler.is_compiling() or fmt is None
            or (torch.is_grad_enabled() and x.requires_grad)):
        return to_channels_last_reference(x, dtype)
    return torch.ops.epamx.to_channels_last(x, dtype)


def to_channels_last_reference(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    if x.dim() not in (4, 5):
        raise ValueError(f"to_channels_last: x must be 4-D (N, C, H, W) or 5-D (N, C, T, H, W), got shape "
                         f"{tuple(x.shape)}")
    return x.to(dtype=dtype or x.dtype, memory_format=_format(x))


@torch.library.register_fake("epamx::to_channels_last")
def _to_channels_last_fake(x, dtype=None):
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device, memory_format=_format(x))
