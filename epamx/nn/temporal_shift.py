from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from epamx.ops import temporal_shift, temporal_shift_, temporal_shift_reference, temporal_unshift_

_LAYOUTS = {"NCTHW": 5, "(NT)CHW": 4}


class TemporalShift(nn.Module):
    """Temporal shift of part of the channels, one frame forward and one back (see epamx.ops.temporal_shift).

    Args:
        fold_div: channels [0, C // fold_div) take frame t + 1, the next C // fold_div take frame t - 1.
        inplace: shift the input tensor itself and return it (no new tensor; only the shifted channels move).
        layout: "NCTHW" for (N, C, T, H, W) inputs, or "(NT)CHW" for TSM's (N*T, C, H, W) with num_segments.
        num_segments: frames per clip, required by (and only allowed with) the "(NT)CHW" layout.
        fused: use the fused epamx op; False runs the plain-PyTorch reference (zeros_like + slicing), out of place.
    """

    def __init__(self, fold_div: int = 8, inplace: bool = False, layout: str = "NCTHW",
                 num_segments: Optional[int] = None, fused: bool = True):
        super().__init__()
        if not isinstance(fold_div, int) or fold_div < 1:
            raise ValueError(f"TemporalShift: fold_div must be an int >= 1, got {fold_div!r}")
        if layout not in _LAYOUTS:
            raise ValueError(f"TemporalShift: layout must be one of {sorted(_LAYOUTS)}, got {layout!r}")
        if layout == "(NT)CHW":
            if not isinstance(num_segments, int) or num_segments < 1:
                raise ValueError(f"TemporalShift: layout '(NT)CHW' needs num_segments, an int >= 1, got {num_segments!r}")
        elif num_segments is not None:
            raise ValueError("TemporalShift: num_segments is only used with layout '(NT)CHW'; the 'NCTHW' layout "
                             "reads T from the input")
        self.fold_div = fold_div
        self.inplace = inplace
        self.layout = layout
        self.num_segments = num_segments
        self.fused = fused

    def _check_rank(self, x: Tensor) -> None:
        if x.dim() != _LAYOUTS[self.layout]:
            expected = "(N, C, T, H, W)" if self.layout == "NCTHW" else "(N*T, C, H, W)"
            raise ValueError(f"TemporalShift(layout={self.layout!r}) expects a {_LAYOUTS[self.layout]}-D input "
                             f"{expected}, got shape {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_rank(x)
        if not self.fused:
            return temporal_shift_reference(x, self.fold_div, self.num_segments)
        shift = temporal_shift_ if self.inplace else temporal_shift
        return shift(x, self.fold_div, self.num_segments)

    @contextlib.contextmanager
    def shifted_in_place(self, x: Tensor) -> Iterator[Tensor]:
        """Shift ``x`` in place for the duration of a ``with`` block, then restore it bit for bit.

        The two frames the shift drops (2 * fold channel planes per clip) are saved and put back after the
        opposite shift. Not differentiable; layout "NCTHW" only (ValueError otherwise). What it saves:
        docs/performance.md, X-ShiftNet blocks.
        """
        if self.layout != "NCTHW":
            raise ValueError("TemporalShift.shifted_in_place supports layout 'NCTHW' only")
        self._check_rank(x)
        fold = x.shape[1] // self.fold_div
        dropped_first = x[:, :fold, :1].clone()
        dropped_last = x[:, fold:2 * fold, -1:].clone()
        temporal_shift_(x, self.fold_div)
        try:
            yield x
        finally:
            temporal_unshift_(x, self.fold_div)
            x[:, :fold, :1] = dropped_first
            x[:, fold:2 * fold, -1:] = dropped_last

    def conv(self, conv: nn.Conv3d, x: Tensor) -> Tensor:
        """``conv(self(x))`` for training, without keeping the shifted copy: ``x`` is shifted in place around the
        convolution in the forward and the backward pass and restored bit for bit each time; autograd saves ``x``
        itself. ``x``'s version counter is left as it was, since ``x`` ends up unchanged. This path is
        differentiable once (no double backward).

        Falls back to ``conv(self(x))`` when the module is not fused or not "NCTHW", when ``x`` is not dense
        (contiguous or channels_last_3d), and under torch.compile (the in-place round trip is invisible to its
        functionalisation). What it saves: docs/performance.md, X-ShiftNet blocks.
        """
        if (not self.fused or self.layout != "NCTHW" or torch.compiler.is_compiling()
                or not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last_3d))):
            return conv(self(x))
        self._check_rank(x)
        return _ShiftedConv.apply(x, conv.weight, conv.bias, self, conv.stride, conv.padding, conv.dilation,
                                  conv.groups)

    def extra_repr(self) -> str:
        text = f"fold_div={self.fold_div}, inplace={self.inplace}, layout={self.layout!r}"
        if self.num_segments is not None:
            text += f", num_segments={self.num_segments}"
        if not self.fused:
            text += ", fused=False"
        return text


class _ShiftedConv(torch.autograd.Function):
    """conv3d(temporal_shift(x)), saving x and the weight only (see TemporalShift.conv)."""

    @staticmethod
    def forward(ctx, x, weight, bias, shift, stride, padding, dilation, groups):
        with torch.autograd._unsafe_preserve_version_counter(x), shift.shifted_in_place(x):
            out = F.conv3d(x, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight)
        ctx.shift, ctx.conv_args = shift, (stride, padding, dilation, groups)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.bias_sizes is not None and ctx.needs_input_grad[2]]
        with torch.autograd._unsafe_preserve_version_counter(x), ctx.shift.shifted_in_place(x):
            d_x, d_weight, d_bias = torch.ops.aten.convolution_backward(
                grad, x, weight, ctx.bias_sizes, stride, padding, dilation, False, [0, 0, 0], groups, mask)
        if d_x is not None:
            temporal_unshift_(d_x, ctx.shift.fold_div)  # the shift's adjoint, in place on a tensor we own
        return d_x, d_weight, d_bias, None, None, None, None, None
