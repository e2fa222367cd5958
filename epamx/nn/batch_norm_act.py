"""Batch norm, an optional channel gate and an activation as one training-mode op where it applies."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from epamx.ops import batch_norm_act as _batch_norm_act

__all__ = ["batch_norm_act", "fused_batch_norm_applies"]


def fused_batch_norm_applies(bn: nn.Module, x: Tensor) -> bool:
    """Whether :func:`batch_norm_act` runs ``bn`` on x as the fused op: a plain nn.BatchNorm1d/2d/3d in training
    mode normalising with batch statistics, on a CPU tensor, outside torch.compile. SyncBatchNorm, eval mode, a
    folded-away batch norm (nn.Identity), CUDA tensors and compiled graphs keep ``bn``'s own forward (why CUDA
    and torch.compile do: docs/performance.md, Operators)."""
    return (type(bn) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) and bn.training
            and x.device.type == "cpu" and not torch.compiler.is_compiling())


def batch_norm_act(bn: nn.modules.batchnorm._BatchNorm, x: Tensor, activation: str = "identity",
                   gate: Optional[Callable[[Tensor], Tensor]] = None, gate_params: Sequence[Tensor] = ()) -> Tensor:
    """``act(bn(x) * gate(mean_S bn(x)))`` in training mode, as :func:`epamx.ops.batch_norm_act` (saves only x
    for backward). ``bn``'s running statistics and ``num_batches_tracked`` are updated as its own forward would;
    check :func:`fused_batch_norm_applies` first.
    """
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # a cumulative moving average, as nn.BatchNorm does
            momentum = 1.0 / float(bn.num_batches_tracked)
    tracked = bn.track_running_stats and bn.running_mean is not None
    return _batch_norm_act(x, bn.weight, bn.bias, bn.running_mean if tracked else None,
                           bn.running_var if tracked else None, momentum, bn.eps, activation, gate, gate_params)
