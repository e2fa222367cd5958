"""Max and mean over channels of every t_stride-th frame, in one pass (CBAM's channel pooling, with EPAM-Net's
temporal subsampling of the pose features fused in).

    out[:, 0] = x[:, :, ::t_stride].max(dim=1)     out[:, 1] = x[:, :, ::t_stride].mean(dim=1)

x (N, C, T, H, W) -> (N, 2, ceil(T / t_stride), H, W), in x's memory format (contiguous or channels_last_3d).
The mean accumulates in float32 for half and bfloat16.
The maximum follows torch.max: NaN propagates, and among equal maxima (ties) the first channel is the arg-max;
the backward pass sends the max gradient to that channel only (as torch.max's gradient does) and the mean
gradient, divided by C, to every channel. Frames the pooling skips get zero gradient. The backward pass saves
only the input (it recomputes the arg-max from x). It is differentiable in turn: linear in the incoming
gradient, and constant in x wherever the arg-max is unique (the second derivative in x is 0, as torch.max's is).
Why the pooling and the frame selection are one op: docs/performance.md, Operators.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

__all__ = ["channel_pool", "channel_pool_reference"]


def channel_pool(x: Tensor, t_stride: int = 1) -> Tensor:
    """(N, C, T, H, W) -> (N, 2, ceil(T / t_stride), H, W): channel max and mean of frames 0, t_stride, ..."""
    return torch.ops.epamx.channel_pool(x, t_stride)


def channel_pool_reference(x: Tensor, t_stride: int = 1) -> Tensor:
    """The eager composition the authors use: a strided frame selection, then torch.max and torch.mean."""
    frames = x[:, :, ::t_stride]
    return torch.cat((frames.max(dim=1, keepdim=True)[0], frames.mean(dim=1, keepdim=True)), dim=1)


# The kernels' results (the pooled tensor, dx) take x's memory format: contiguous, or channels_last_3d.
def _empty_in_format_of(x: Tensor, shape) -> Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))


@torch.library.register_fake("epamx::channel_pool")
def _channel_pool_fake(x, t_stride=1):
    n, _, t, h, w = x.shape
    return _empty_in_format_of(x, (n, 2, (t + t_stride - 1) // t_stride, h, w))


@torch.library.register_fake("epamx::_channel_pool_backward")
def _channel_pool_backward_fake(grad, x, t_stride):
    return _empty_in_format_of(x, x.shape)


def _setup_context(ctx, inputs, output):
    x, ctx.t_stride = inputs
    ctx.save_for_backward(x)


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.epamx._channel_pool_backward(grad, x, ctx.t_stride), None


torch.library.register_autograd("epamx::channel_pool", _backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    _, x, ctx.t_stride = inputs
    ctx.save_for_backward(x)


def _backward_backward(ctx, ggx):
    """The backward op's own backward: for the gradient ggx flowing into dx (N, C, T, H, W), the gradient of the
    pooled gradient (N, 2, T', H, W) is ggx pooled the same way: read at the arg-max channel, averaged over C."""
    (x,) = ctx.saved_tensors
    t_stride = ctx.t_stride
    n, _, t, h, w = x.shape
    t_out = (t + t_stride - 1) // t_stride
    # The backward op with a gradient of 1 on the max and 0 on the mean marks the arg-max channels (with the
    # kernel's own tie and NaN rules) at the pooled frames, and nothing elsewhere.
    route_max = torch.cat((x.new_ones((n, 1, t_out, h, w)), x.new_zeros((n, 1, t_out, h, w))), dim=1)
    is_max = torch.ops.epamx._channel_pool_backward(route_max, x, t_stride)
    frames = ggx[:, :, ::t_stride]
    at_max = frames.where(is_max[:, :, ::t_stride] != 0, 0)  # a select, so inf elsewhere cannot make 0 * inf
    d_grad = torch.cat((at_max.sum(dim=1, keepdim=True), frames.mean(dim=1, keepdim=True)), dim=1)
    return d_grad if ctx.needs_input_grad[0] else None, None, None


torch.library.register_autograd("epamx::_channel_pool_backward", _backward_backward,
                                setup_context=_setup_backward_context)
