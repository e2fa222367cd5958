"""Temporal shift (TSM, Lin et al. 2019) as used in every X-ShiftNet block of EPAM-Net.

With fold = C // fold_div, output frame t of channel c is input frame t + 1 for c in [0, fold), frame t - 1 for
c in [fold, 2 * fold), frame t otherwise, and zero where that frame does not exist (no wrap-around).

Layouts: a 5-D input is (N, C, T, H, W), as in EPAM-Net; a 4-D input is (N*T, C, H, W) with
``num_segments = T``, as in TSM. Any strides are accepted. The out-of-place result is contiguous, or in the
input's channels-last format (channels_last, channels_last_3d) for a channels-last input. How each layout is
read: docs/performance.md, Operators.

Edge cases: fold_div must be an int with 1 <= fold <= C / 2, so 2 <= fold_div <= C (a fold of 0 would silently
make the shift the identity, so it raises; only an input with C = 0 channels takes any fold_div >= 1). With T = 1
the shifted channels become zero. Empty tensors are returned as they are. The in-place ops refuse inputs whose
elements share memory (expand()ed or as_strided views), whose result would depend on the kernel's write order.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

__all__ = ["temporal_shift", "temporal_shift_", "temporal_shift_reference", "temporal_unshift_"]


def _check_int_args(op: str, fold_div, num_segments) -> None:
    # The dispatcher would say "Unable to cast Python instance ..." without naming the argument. Anything with
    # __index__ (NumPy integers, one-element integer tensors) is an int to it, so those still pass.
    for name, value in (("fold_div", fold_div), ("num_segments", num_segments)):
        if (value is None and name == "num_segments") or isinstance(value, (int, torch.SymInt)):
            continue
        if not hasattr(type(value), "__index__"):
            raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}")


def temporal_shift(input: Tensor, fold_div: int = 8, num_segments: Optional[int] = None) -> Tensor:
    """Shift 2 * (C // fold_div) channels of ``input`` one frame along time, out of place.

    Args:
        input: (N, C, T, H, W), or (N*T, C, H, W) with ``num_segments``; float32/64, float16 or bfloat16.
        fold_div: 1 / fraction of channels shifted each way (8 for EPAM-Net's RGB stream, 4 for its pose stream).
        num_segments: frames per clip T, only for 4-D inputs.

    Returns:
        A new tensor of the input's shape, contiguous (channels-last for a channels-last input). Differentiable
        (the gradient is the opposite shift).
    """
    _check_int_args("temporal_shift", fold_div, num_segments)
    return torch.ops.epamx.temporal_shift(input, fold_div, num_segments)


def temporal_shift_(input: Tensor, fold_div: int = 8, num_segments: Optional[int] = None) -> Tensor:
    """In-place :func:`temporal_shift`: moves only the 2 * fold shifted channels of ``input`` and returns it.

    Differentiable like any in-place torch op (the input must not be a leaf that requires grad); the backward
    pass saves no tensors.
    """
    _check_int_args("temporal_shift_", fold_div, num_segments)
    if torch.is_grad_enabled() and input.requires_grad:
        if torch.compiler.is_compiling():
            # A compiled graph is functional anyway, so the shift is traced as the out-of-place op and a copy back.
            # (torch 2.11's AOTAutograd traces _TemporalShiftInplace's forward but drops its backward's shift.)
            return input.copy_(torch.ops.epamx.temporal_shift(input, fold_div, num_segments))
        return _TemporalShiftInplace.apply(input, fold_div, num_segments)
    torch.ops.epamx.temporal_shift_(input, fold_div, num_segments)
    return input


def temporal_unshift_(input: Tensor, fold_div: int = 8, num_segments: Optional[int] = None) -> Tensor:
    """The opposite shift, in place (the adjoint of :func:`temporal_shift_`), returning ``input``.

    After ``temporal_shift_(x)`` it restores every frame of ``x`` except the two the shift dropped: frame 0 of
    channels [0, fold) and frame T - 1 of channels [fold, 2 * fold), which come back as zeros. Not differentiable.
    """
    _check_int_args("temporal_unshift_", fold_div, num_segments)
    torch.ops.epamx._temporal_shift_backward_(input, fold_div, num_segments)
    return input


def temporal_shift_reference(input: Tensor, fold_div: int = 8, num_segments: Optional[int] = None) -> Tensor:
    """Plain-PyTorch temporal shift, ``zeros_like`` + slicing as in the authors' code and the TSM repository.

    The reference the tests compare against and the baseline the benchmarks measure.
    """
    if input.dim() == 4:
        nt, c, h, w = input.shape
        x = input.reshape(nt // num_segments, num_segments, c, h, w).transpose(1, 2)
    else:
        x = input
    fold = x.shape[1] // fold_div
    out = torch.zeros_like(x)
    out[:, :fold, :-1] = x[:, :fold, 1:]
    out[:, fold : 2 * fold, 1:] = x[:, fold : 2 * fold, :-1]
    out[:, 2 * fold :] = x[:, 2 * fold :]
    if input.dim() == 4:
        return out.transpose(1, 2).reshape(input.shape)
    return out


class _TemporalShiftInplace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, fold_div: int, num_segments: Optional[int]) -> Tensor:
        torch.ops.epamx.temporal_shift_(x, fold_div, num_segments)
        ctx.mark_dirty(x)
        ctx.fold_div, ctx.num_segments = fold_div, num_segments
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return torch.ops.epamx._temporal_shift_backward(grad, ctx.fold_div, ctx.num_segments), None, None


# ---- registrations: fake kernels (shapes for torch.compile / meta tensors) and autograd --------------------------

def _empty_like_result(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))


@torch.library.register_fake("epamx::temporal_shift")
def _temporal_shift_fake(input, fold_div=8, num_segments=None):
    return _empty_like_result(input)


@torch.library.register_fake("epamx::_temporal_shift_backward")
def _temporal_shift_backward_fake(grad, fold_div, num_segments):
    return _empty_like_result(grad)


@torch.library.register_fake("epamx::temporal_shift_")
def _temporal_shift_inplace_fake(input, fold_div=8, num_segments=None):
    return None


@torch.library.register_fake("epamx::_temporal_shift_backward_")
def _temporal_shift_backward_inplace_fake(grad, fold_div, num_segments):
    return None


def _setup_context(ctx, inputs, output):
    _, ctx.fold_div, ctx.num_segments = inputs


def _shift_backward(ctx, grad):
    return torch.ops.epamx._temporal_shift_backward(grad, ctx.fold_div, ctx.num_segments), None, None


def _unshift_backward(ctx, grad):
    # The adjoint of the backward shift is the forward shift: this gives double backward.
    return torch.ops.epamx.temporal_shift(grad, ctx.fold_div, ctx.num_segments), None, None


torch.library.register_autograd("epamx::temporal_shift", _shift_backward, setup_context=_setup_context)
torch.library.register_autograd("epamx::_temporal_shift_backward", _unshift_backward, setup_context=_setup_context)
