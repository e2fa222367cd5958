"""Squeeze-and-excitation followed by Swish, in inference: the two passes over a block's depthwise output.

    channel_sums(x)[n, c] = sum of x[n, c, ...]             gate_silu_(x, gate): x = silu(x * gate[n, c])
                                                            gate_silu_(x): x = silu(x)

In between, the squeeze-and-excitation MLP turns the channel means into the gate (epamx.models' SqueezeExcite).
ATen takes a pass for the sum, one for the gating and one for the SiLU (and its channels-last bfloat16 sums are
slow); these kernels take one pass each. CPU only, without gradients: the inference copy that
epamx.models.optimize_for_inference makes calls them on CPU tensors; elsewhere use the references.

channel_sums accumulates in x's accumulation dtype (float32 for half, bfloat16 and float32, float64 for float64)
over fixed blocks of 256 positions, the blocks added in float64, so the result does not depend on the thread
count. gate_silu_ is within 4 float32 ulp of F.silu (AVX-512: its own exp and a refined reciprocal; other builds
exp_u20 and a division). In bfloat16 (AVX-512) it computes to 1.3e-4, below bfloat16's rounding (results differ
from F.silu's rounded ones by one bfloat16 ulp in about 0.7% of values, for inputs drawn from N(0, 3)), and rounds
with the CPU's bfloat16 instructions where it has them (the same bits as its integer rounding but for float32
denormals; EPAMX_DISABLE_AVX512_BF16=1 turns them off). Without a gate it is the Swish of X-ShiftNet's blocks without
squeeze-and-excitation, which the inference copy runs after the depthwise convolution instead of oneDNN's swish
post-op (1.0-1.5x faster per block). Layouts: any; channels-last and contiguous x are read in place, others through
a copy. What they buy: docs/performance.md, Inference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["channel_sums", "channel_sums_reference", "gate_silu_", "gate_silu_reference"]


def channel_sums(x: Tensor) -> Tensor:
    """(N, C, ...) -> (N, C): the sum of each sample's channel, in x's accumulation dtype (float32, or float64
    for a float64 x). CPU."""
    return torch.ops.epamx.channel_sums(x)


def channel_sums_reference(x: Tensor) -> Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(acc).sum(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x.to(acc)


def gate_silu_(x: Tensor, gate: Optional[Tensor] = None) -> Tensor:
    """x = silu(x * gate[n, c]) in place and returned, for x (N, C, ...) and gate (N, C) in x's accumulation
    dtype; without a gate x = silu(x). CPU, no gradients."""
    if torch.is_grad_enabled() and (x.requires_grad or (gate is not None and gate.requires_grad)):
        raise RuntimeError("gate_silu_: an inference op, it has no gradient; use gate_silu_reference to "
                           "differentiate")
    torch.ops.epamx.gate_silu_(x, gate)
    return x


def gate_silu_reference(x: Tensor, gate: Optional[Tensor] = None) -> Tensor:
    if gate is None:
        return F.silu(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).to(x.dtype)
    view = (*gate.shape, *(1,) * (x.dim() - 2))
    return F.silu(x.to(gate.dtype) * gate.view(view)).to(x.dtype)


@torch.library.register_fake("epamx::channel_sums")
def _channel_sums_fake(x):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((x.shape[0], x.shape[1]), dtype=acc)


@torch.library.register_fake("epamx::gate_silu_")
def _gate_silu_fake(x, gate=None):
    return None
