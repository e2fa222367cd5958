"""Which memory format a model runs in, chosen per device so that users get the fast one without asking:
``"auto"`` is ``channels_last_3d`` on CPUs and contiguous elsewhere (why: docs/performance.md, Memory formats).

A model holding a :class:`MemoryFormatPolicy` converts its inputs in ``forward`` and, once, its own weights, so
that the two agree. The logits are the same as in contiguous memory up to float rounding.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from epamx.ops import to_channels_last

__all__ = ["MEMORY_FORMATS", "preferred_memory_format", "resolve_memory_format"]

# The values a model's ``memory_format`` accepts. "preserve": run in whatever format the inputs and weights have.
MEMORY_FORMATS = ("auto", "channels_last_3d", "contiguous", "preserve")
_FORMATS = {"channels_last_3d": torch.channels_last_3d, "contiguous": torch.contiguous_format}


def preferred_memory_format(device: Union[torch.device, str]) -> torch.memory_format:
    """channels_last_3d on CPU (measured faster there), contiguous elsewhere (channels-last has not been measured
    faster on CUDA); see docs/performance.md, Memory formats."""
    return torch.channels_last_3d if torch.device(device).type == "cpu" else torch.contiguous_format


def check_memory_format(value: str, owner: str) -> str:
    if value not in MEMORY_FORMATS:
        raise ValueError(f"{owner}: memory_format must be one of {', '.join(MEMORY_FORMATS)}, got {value!r}")
    return value


def resolve_memory_format(value: str, device: Union[torch.device, str]) -> Optional[torch.memory_format]:
    """The torch memory format a policy ``value`` asks for on ``device``; None for "preserve"."""
    if value == "preserve":
        return None
    if value == "auto":
        return preferred_memory_format(device)
    return _FORMATS[value]


def _converted(x: Tensor, fmt: torch.memory_format) -> Tensor:
    """x in ``fmt``: epamx's one-pass conversion into channels_last_3d (ATen's ran 2-4x slower on the clips)."""
    if fmt == torch.channels_last_3d:
        return to_channels_last(x)
    return x.contiguous(memory_format=fmt)


def _layout_probe(module: nn.Module) -> Optional[Tensor]:
    """The module's first 5-D weight whose contiguous and channels-last layouts differ (more than one input
    channel and a kernel with spatial extent: the stem convolution in the X-ShiftNets), or None."""
    for p in module.parameters():
        if p.dim() == 5 and p.shape[1] > 1 and p.shape[2:].numel() > 1:
            return p
    return None


class MemoryFormatPolicy:
    """Converts a module's weights (once) and its 5-D inputs (every call) to the format its policy asks for.

    Whether the weights are converted already is read from the first weight whose layouts differ. Under
    ``torch.compile`` the weights are left alone (a compiled graph must not mutate its module): convert the module
    before compiling (``model.to(memory_format=...)`` or :func:`epamx.models.optimize_for_inference`).
    """

    def __init__(self, value: str, owner: str):
        self.value = check_memory_format(value, owner)

    def prepare(self, module: nn.Module, *inputs: Optional[Tensor]):
        device = next((x.device for x in inputs if x is not None), None)
        fmt = None if device is None else resolve_memory_format(self.value, device)
        if fmt is None:
            return inputs
        if not torch.compiler.is_compiling():
            probe = _layout_probe(module)
            if probe is not None and not probe.is_contiguous(memory_format=fmt):
                module.to(memory_format=fmt)
        return tuple(_converted(x, fmt) if x is not None and x.dim() == 5 else x for x in inputs)
