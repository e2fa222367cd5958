"""Training-mode batch norm fused with what follows it in an X-ShiftNet block: an optional per-sample channel gate
(squeeze-and-excitation) and an activation (identity, ReLU or SiLU).

    out = act(BN(x) * gate(mean_S BN(x)))      or, without a gate, act(BN(x))

BN uses the batch statistics, so BN(x) = a[c] * x + b[c] (a = weight / sqrt(var + eps), b = bias - mean * a), and
with the gate's per-sample factor the whole chain is act(x * scale[n, c] + shift[n, c]): one per-(n, c) affine
map and an activation, the op ``affine_act``. Only x is saved for backward (the activation's derivative is
recomputed from it); the passes over memory this costs and saves: docs/performance.md, Operators.

The reductions accumulate in float64, so the batch variance comes from E[x^2] - E[x]^2 without cancellation
trouble at these sizes. Results match :func:`batch_norm_act_reference` (F.batch_norm, the gate, the activation)
to float rounding; at the ReLU's kink an element within rounding of 0 may take the other side.

Layouts: any input; 4-D/5-D channels-last inputs are read in place and give channels-last outputs, others are
read (and answered) contiguous.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "affine_act", "affine_act_reference", "batch_norm_act", "batch_norm_act_reference"]

# The activation codes the kernels take.
ACTIVATIONS = {"identity": 0, "relu": 1, "silu": 2}


def _activation_code(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def affine_act(x: Tensor, scale: Tensor, shift: Tensor, activation: str = "relu") -> Tensor:
    """act(x * scale[n, c] + shift[n, c]) for x (N, C, ...), scale and shift (N, C) in x's accumulation dtype
    (float32, or float64 for a float64 x). Differentiable in x, scale and shift."""
    return torch.ops.epamx.affine_act(x, scale, shift, _activation_code(activation))


def _activate(y: Tensor, activation: str) -> Tensor:
    _activation_code(activation)
    if activation == "relu":
        return torch.relu(y)
    if activation == "silu":
        return F.silu(y)
    return y


def affine_act_reference(x: Tensor, scale: Tensor, shift: Tensor, activation: str = "relu") -> Tensor:
    view = (*scale.shape, *(1,) * (x.dim() - 2))
    return _activate(x * scale.view(view).to(x.dtype) + shift.view(view).to(x.dtype), activation)


def batch_norm_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], momentum: float = 0.1, eps: float = 1e-5,
                   activation: str = "relu", gate: Optional[Callable[[Tensor], Tensor]] = None,
                   gate_params: Sequence[Tensor] = ()) -> Tensor:
    """Batch norm with batch statistics (training mode), then ``gate``, then the activation, as one op.

    Args:
        x: (N, C, ...), N * prod(...) > 1.
        weight, bias: (C,) or None; running_mean, running_var: (C,) updated in place (momentum as
            F.batch_norm's, the variance unbiased), or None.
        activation: "identity", "relu" or "silu".
        gate: maps the per-sample channel means of BN(x), (N, C), to factors (N, C) that multiply BN(x)
            (squeeze-and-excitation); it runs on tiny tensors under autograd, so any torch code works.
        gate_params: the tensors ``gate`` uses that need gradients (they are inputs of the autograd node).

    Differentiable once in x, weight, bias and gate_params (no double backward).
    """
    n, c = x.shape[:2]
    if x.numel() // max(c, 1) <= 1:
        raise ValueError(f"batch_norm_act: expected more than 1 value per channel when training, got input size "
                         f"{tuple(x.shape)}")
    return _BatchNormAct.apply(x, weight, bias, running_mean, running_var, momentum, eps,
                               _activation_code(activation), gate, *gate_params)


def batch_norm_act_reference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                             running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float = 0.1,
                             eps: float = 1e-5, activation: str = "relu",
                             gate: Optional[Callable[[Tensor], Tensor]] = None,
                             gate_params: Sequence[Tensor] = ()) -> Tensor:
    """F.batch_norm (training), the gate on the per-sample channel means, the activation: unfused."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    if gate is not None:
        dims = tuple(range(2, x.dim()))
        y = y * gate(y.mean(dim=dims)).view(*x.shape[:2], *(1,) * (x.dim() - 2))
    return _activate(y, activation)


class _BatchNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, act, gate, *gate_params):
        n, c = x.shape[:2]
        count = x.numel() // c
        per_sample = count // n
        s1, s2 = torch.ops.epamx._channel_moments(x)
        mean = s1.sum(0) / count
        var = (s2.sum(0) / count - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_((mean * momentum).to(running_mean.dtype))
        if running_var is not None:
            running_var.mul_(1 - momentum).add_((var * (count / (count - 1) * momentum)).to(running_var.dtype))
        a = invstd * weight.double() if weight is not None else invstd
        b = bias.double() - mean * a if bias is not None else -mean * a
        factor = None
        ctx.gate_graph = None
        if gate is not None:
            with torch.enable_grad():
                pooled = (s1 / per_sample * a + b).to(x.dtype).requires_grad_()
                gated = gate(pooled)
            ctx.gate_graph = (pooled, gated)
            ctx.gate_needs_grad = [p.requires_grad for p in gate_params]
            ctx.gate_params = gate_params
            factor = gated.detach().double()
        acc = _acc_dtype(x)
        scale = (a * factor if factor is not None else a.expand(n, c)).to(acc).contiguous()
        shift = (b * factor if factor is not None else b.expand(n, c)).to(acc).contiguous()
        out = torch.ops.epamx.affine_act(x, scale, shift, act)
        ctx.save_for_backward(x, scale, shift, a, b, mean, invstd, s1, factor)
        ctx.act, ctx.count, ctx.per_sample = act, count, per_sample
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.num_gate_params = len(gate_params)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, scale, shift, a, b, mean, invstd, s1, factor = ctx.saved_tensors
        count, per_sample = ctx.count, ctx.per_sample
        sum_u, sum_ux = torch.ops.epamx._affine_act_backward_reduce(grad, x, scale, shift, ctx.act)
        gate_grads = [None] * ctx.num_gate_params
        d_pooled = None
        if ctx.gate_graph is not None:
            pooled, gated = ctx.gate_graph
            params = [p for p, needed in zip(ctx.gate_params, ctx.gate_needs_grad) if needed]
            d_gated = a * sum_ux + b * sum_u  # d loss / d gate output: the sum over S of u * BN(x)
            # retain_graph: autograd may call this backward more than once (torch.autograd.gradcheck does).
            grads = iter(torch.autograd.grad(gated, [pooled, *params], d_gated.to(gated.dtype), retain_graph=True,
                                             allow_unused=True))
            d_pooled = next(grads).double()
            gate_grads = [next(grads) if needed else None for needed in ctx.gate_needs_grad]
        # dL/dBN(x) = u * factor + d_pooled / S; the batch-norm backward needs only its per-channel sums.
        weighted_u = sum_u * factor if factor is not None else sum_u
        weighted_ux = sum_ux * factor if factor is not None else sum_ux
        d_bias = weighted_u.sum(0)
        d_weight = (weighted_ux - mean * weighted_u).sum(0) * invstd
        if d_pooled is not None:
            d_bias = d_bias + d_pooled.sum(0)
            d_weight = d_weight + (d_pooled * (s1 / per_sample - mean)).sum(0) * invstd
        acc = _acc_dtype(x)
        n, c = x.shape[:2]
        coef_x = (-a * invstd * d_weight / count).expand(n, c)
        coef_1 = (a * (invstd * mean * d_weight - d_bias) / count).expand(n, c)
        if d_pooled is not None:
            coef_1 = coef_1 + a * d_pooled / per_sample
        dx = torch.ops.epamx._affine_act_backward(grad, x, scale, shift, scale, coef_x.to(acc).contiguous(),
                                                  coef_1.to(acc).contiguous(), ctx.act)
        d_weight = d_weight.to(ctx.weight_dtype) if ctx.weight_dtype is not None else None
        d_bias = d_bias.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        return (dx, d_weight, d_bias, None, None, None, None, None, None, *gate_grads)


# ---- registrations: fake kernels (shapes for torch.compile / meta tensors) and autograd of affine_act ------------

def _layout_like(x: Tensor) -> torch.memory_format:
    if not x.is_contiguous():
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
    return torch.contiguous_format


def _rows(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[:2], dtype=torch.float64)


@torch.library.register_fake("epamx::_channel_moments")
def _channel_moments_fake(x):
    return _rows(x), _rows(x)


@torch.library.register_fake("epamx::affine_act")
def _affine_act_fake(x, scale, shift, activation):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_layout_like(x))


@torch.library.register_fake("epamx::_affine_act_backward_reduce")
def _affine_act_backward_reduce_fake(grad, x, scale, shift, activation):
    return _rows(x), _rows(x)


@torch.library.register_fake("epamx::_affine_act_backward")
def _affine_act_backward_fake(grad, x, scale, shift, coef_u, coef_x, coef_1, activation):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_layout_like(x))


def _setup_context(ctx, inputs, output):
    x, scale, shift, ctx.activation = inputs
    ctx.save_for_backward(x, scale, shift)


def _affine_act_backward(ctx, grad):
    x, scale, shift = ctx.saved_tensors
    d_x = d_scale = d_shift = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        sum_u, sum_ux = torch.ops.epamx._affine_act_backward_reduce(grad, x, scale, shift, ctx.activation)
        d_scale, d_shift = sum_ux.to(scale.dtype), sum_u.to(shift.dtype)
    if ctx.needs_input_grad[0]:
        zeros = torch.zeros_like(scale)
        d_x = torch.ops.epamx._affine_act_backward(grad, x, scale, shift, scale, zeros, zeros, ctx.activation)
    return d_x, d_scale, d_shift, None


torch.library.register_autograd("epamx::affine_act", _affine_act_backward, setup_context=_setup_context)
