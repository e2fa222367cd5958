"""An inference-only copy of a model, rewritten for speed with the same logits (within float rounding)."""
from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from epamx.models.epamnet import EPAMNet
from epamx.models.memory_format import check_memory_format, resolve_memory_format
from epamx.models.streams import PoseStream, RGBStream
from epamx.models.xshiftnet import ConvBNAct, XShiftBlock
from epamx.nn import SpatialTemporalAttention

__all__ = ["optimize_for_inference"]


def _fold(conv: nn.Module, bn: nn.Module) -> nn.Module:
    if not isinstance(bn, nn.BatchNorm3d) or bn.running_mean is None:
        return conv
    return fuse_conv_bn_eval(conv, bn)


def optimize_for_inference(model: nn.Module, memory_format: str = "auto") -> nn.Module:
    """A copy of ``model`` (an :class:`EPAMNet`, :class:`RGBStream` or :class:`PoseStream`, on any device) for
    inference only; ``model`` itself is left as it was.

    - Every batch norm is folded into the convolution before it (the backbones' conv+BN pairs and the attention's
      spatial conv+BN).
    - The copy computes in ``memory_format`` ("auto": channels_last_3d on CPU, contiguous on CUDA), its weights
      converted once, here.
    - The Swish activations run in place.
    - Parameters no longer require gradients; the copy is in eval mode. The fused epamx ops are kept (with the
      temporal shift done in place around its convolution).

    The logits match the original's in eval mode within float rounding (|difference| <= 1e-4 for the
    2.5-million-parameter EPAM-Net in float32). The copy can be compiled with ``torch.compile``; calling
    ``.train()`` on it does not bring batch norm back: keep the original for training. Raises TypeError for
    other models and ValueError for an unknown ``memory_format``. What each rewrite buys: docs/performance.md,
    Inference.
    """
    if not isinstance(model, (EPAMNet, RGBStream, PoseStream)):
        raise TypeError(f"optimize_for_inference: expected an EPAMNet, RGBStream or PoseStream, got "
                        f"{type(model).__name__}")
    check_memory_format(memory_format, "optimize_for_inference")
    fast = copy.deepcopy(model).eval()
    for module in fast.modules():
        if isinstance(module, ConvBNAct):
            module.conv = _fold(module.conv, module.bn)
            module.bn = nn.Identity()
        elif isinstance(module, SpatialTemporalAttention):
            module.spatial_conv = _fold(module.spatial_conv, module.spatial_bn)
            module.spatial_bn = nn.Identity()
        elif isinstance(module, XShiftBlock) and isinstance(module.swish, nn.SiLU):
            module.swish = nn.SiLU(inplace=True)
    fast.requires_grad_(False)
    device = next(fast.parameters()).device
    fmt = resolve_memory_format(memory_format, device)
    if fmt is not None:
        fast = fast.to(memory_format=fmt)
    fast.memory_format = memory_format
    return fast
