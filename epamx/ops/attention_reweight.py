"""Reweighting of EPAM-Net's RGB features by its pose-driven attention maps, fused into one pass.

    out = x * (1 + S * A)       (the authors write it x + x * (S * A))

x is (N, C, T, H, W), the spatial map S (N, 1, T, H, W) broadcasts over channels, the temporal map A
(N, 1, T, 1, 1) over channels and space. Computed in float32 for half and bfloat16 inputs (float64 for float64)
and rounded once. The backward pass saves only the inputs: dx = g * (1 + S*A), dS = A * sum_c g*x,
dA = sum_{c,h,w} g*x*S. That backward op is differentiable in turn (in plain torch ops and itself), so gradients
of any order are exact. (Performance: docs/performance.md, Operators.)
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

__all__ = ["attention_reweight", "attention_reweight_reference"]


def attention_reweight(x: Tensor, spatial: Tensor, temporal: Tensor) -> Tensor:
    """x * (1 + spatial * temporal) for x (N, C, T, H, W), spatial (N, 1, T, H, W), temporal (N, 1, T, 1, 1).

    The result has x's dtype and memory format (contiguous or channels_last_3d; x of other strides is copied into
    the format it is closest to). Maps of another floating dtype (as autocast may produce) are cast to x's dtype
    first; their gradients come back in their own dtype.
    """
    if spatial.dtype != x.dtype and spatial.is_floating_point():
        spatial = spatial.to(x.dtype)
    if temporal.dtype != x.dtype and temporal.is_floating_point():
        temporal = temporal.to(x.dtype)
    return torch.ops.epamx.attention_reweight(x, spatial, temporal)


def attention_reweight_reference(x: Tensor, spatial: Tensor, temporal: Tensor) -> Tensor:
    """The authors' eager composition, x + x * (S * A): the reference for tests and benchmarks."""
    return x + x * (spatial * temporal)


def _empty_like_x(x: Tensor) -> Tensor:
    """The result and dx take x's memory format: contiguous, or channels_last_3d."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))


@torch.library.register_fake("epamx::attention_reweight")
def _attention_reweight_fake(x, spatial, temporal):
    return _empty_like_x(x)


@torch.library.register_fake("epamx::_attention_reweight_backward")
def _attention_reweight_backward_fake(grad, x, spatial, temporal):
    return _empty_like_x(x), spatial.new_empty(spatial.shape), temporal.new_empty(temporal.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, spatial, temporal = ctx.saved_tensors
    dx, dspatial, dtemporal = torch.ops.epamx._attention_reweight_backward(grad, x, spatial, temporal)
    return tuple(g if needed else None for g, needed in zip((dx, dspatial, dtemporal), ctx.needs_input_grad))


torch.library.register_autograd("epamx::attention_reweight", _backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_backward(ctx, ggx, ggs, gga):
    """The backward op's own backward, given the gradients (ggx, ggs, gga) flowing into its outputs (dx, dS, dA)."""
    grad, x, spatial, temporal = ctx.saved_tensors
    # dx = g * (1 + S*A) is the forward op's output with g in place of x: its vector-Jacobian product is the
    # backward op itself, applied to ggx.
    d_grad, d_spatial, d_temporal = torch.ops.epamx._attention_reweight_backward(ggx, grad, spatial, temporal)
    # dS = A * sum_c g*x and dA = sum_{c,h,w} g*x*S are bilinear in g and x.
    weight = ggs * temporal + gga * spatial  # (N, 1, T, H, W): what each g*x product feeds
    gx = (grad * x).sum(dim=1, keepdim=True)
    grads = (d_grad + x * weight, grad * weight, d_spatial + gga * gx,
             d_temporal + (ggs * gx).sum(dim=(3, 4), keepdim=True))
    return tuple(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad))


torch.library.register_autograd("epamx::_attention_reweight_backward", _backward_backward,
                                setup_context=_setup_backward_context)
