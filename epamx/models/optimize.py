"""An inference-only copy of a model, rewritten for speed with the same logits (within float rounding)."""
from __future__ import annotations

import copy
import functools
import threading
import warnings
from typing import Any, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from epamx.memory import cpu_cache_enter, cpu_cache_exit
from epamx.models.epamnet import EPAMNet
from epamx.models.memory_format import check_memory_format, resolve_memory_format
from epamx.models.streams import PoseStream, RGBStream
from epamx.models.xshiftnet import ConvBNAct, SqueezeExcite, XShiftBlock
from epamx.nn import SpatialTemporalAttention
from epamx.nn.conv_act import pack_weight
from epamx.ops import to_channels_last

__all__ = ["INFERENCE_DTYPES", "cpu_has_bf16", "optimize_for_inference"]

# The dtypes optimize_for_inference computes in, by name (config and CLI spelling).
INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _fold(conv: nn.Module, bn: nn.Module) -> nn.Module:
    if not isinstance(bn, nn.BatchNorm3d) or bn.running_mean is None:
        return conv
    return fuse_conv_bn_eval(conv, bn)


@functools.lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX-BF16), which oneDNN's bfloat16
    convolutions need to be faster than float32 (without them they emulate, several times slower)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return "avx512_bf16" in flags or "amx_bf16" in flags or torch.backends.cpu.get_cpu_capability() == "AVX512_BF16"


def _cast_floating(value: Any, dtype: torch.dtype, clip_format: Optional[torch.memory_format] = None) -> Any:
    """value's floating tensors in ``dtype``; 5-D ones (clips) also in ``clip_format`` where given, in the same
    pass (the forward would otherwise convert the cast copy again)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        if clip_format == torch.channels_last_3d and value.dim() == 5:
            return to_channels_last(value, dtype)
        if clip_format is not None and value.dim() == 5:
            return value.to(dtype=dtype, memory_format=clip_format)
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floating(v, dtype, clip_format) for v in value)
    return value


def _inputs_to(dtype: torch.dtype, clip_format: Optional[torch.memory_format]):
    def hook(module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        return _cast_floating(args, dtype, clip_format)
    return hook


def _outputs_to_float32(module: nn.Module, args: Tuple[Any, ...], output: Any) -> Any:
    return _cast_floating(output, torch.float32)


class _CpuCacheHooks:
    """Forward hooks that hold an epamx.memory.cpu_cache scope around each eager forward of a model on a CPU."""

    def __init__(self):
        self._entered = threading.local()

    # Deep copies and pickles of the model get hooks of their own, with no scope open (a thread-local cannot be
    # copied).
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._entered = threading.local()

    def _stack(self) -> list:
        if not hasattr(self._entered, "stack"):
            self._entered.stack = []
        return self._entered.stack

    def before(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        if torch.compiler.is_compiling():  # compiled code: the caller decides (docs/performance.md, Inference)
            return
        on_cpu = next(module.parameters()).device.type == "cpu"
        if on_cpu:
            cpu_cache_enter()
        self._stack().append(on_cpu)

    def after(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        stack = self._stack()
        if stack and stack.pop():
            cpu_cache_exit()


def _to_dtype_but_squeeze_excite(model: nn.Module, dtype: torch.dtype) -> None:
    """model in ``dtype`` (in place) but for its squeeze-and-excitation MLPs, which stay in float32: they read
    float32 channel sums and give the float32 gate that the gating pass takes, on (N, C) tensors where bfloat16
    would only add two conversions per block (and its matrix products run slower at that size)."""
    squeeze = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, SqueezeExcite)]
    for parent, name, _ in squeeze:
        setattr(parent, name, None)
    model.to(dtype)
    for parent, name, child in squeeze:
        setattr(parent, name, child)


def _resolve_dtype(dtype) -> torch.dtype:
    resolved = INFERENCE_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if resolved not in INFERENCE_DTYPES.values():
        raise ValueError(f"optimize_for_inference: dtype must be torch.float32 or torch.bfloat16 (or their names), "
                         f"got {dtype!r}")
    return resolved


def optimize_for_inference(model: nn.Module, memory_format: str = "auto",
                           dtype: torch.dtype = torch.float32, cache_memory: bool = True) -> nn.Module:
    """A copy of ``model`` (an :class:`EPAMNet`, :class:`RGBStream` or :class:`PoseStream`, on any device) for
    inference only; ``model`` itself is left as it was.

    - Every batch norm is folded into the convolution before it (the backbones' conv+BN pairs and the attention's
      spatial conv+BN).
    - The copy computes in ``memory_format`` ("auto": channels_last_3d on CPU, contiguous on CUDA), its weights
      converted once, here.
    - The Swish activations run in place; squeeze-and-excitation gates in place (``SqueezeExcite.forward_``).
    - Parameters no longer require gradients; the copy is in eval mode. The fused epamx ops are kept (without
      ``cache_memory``, the temporal shift is done in place around its convolution). On a CPU without gradients
      each X-ShiftNet block takes its lean inference path (``XShiftBlock._forward_folded``): every convolution
      one oneDNN call with its activation or residual sum, the same results as the general forward.

    - ``dtype=torch.bfloat16`` (or ``"bfloat16"``): the folded weights are converted to bfloat16 once, here, and
      the copy computes in bfloat16 (oneDNN's bfloat16 convolutions accumulate in float32; the squeeze-and-excitation
      MLPs stay in float32); it takes float32 inputs and returns float32 logits. On a CPU without bfloat16
      instructions (:func:`cpu_has_bf16`) it warns that this is slower than float32.
    - ``cache_memory`` (default True): on a CPU each forward runs in an :func:`epamx.memory.cpu_cache` scope, so
      the next forward reuses its activations' memory (kept between calls: about 2.7x the activations of one
      forward; :func:`epamx.memory.empty_cpu_cache` releases it). Compiled calls are left to the caller.

    The logits match the original's in eval mode within float rounding (|difference| <= 1e-4 for the
    2.5-million-parameter EPAM-Net in float32, about 1e-2 in bfloat16 with the same top-1 class). The copy can be compiled with ``torch.compile``; calling
    ``.train()`` on it does not bring batch norm back: keep the original for training. Raises TypeError for
    other models and ValueError for an unknown ``memory_format`` or ``dtype``. What each rewrite buys: docs/performance.md,
    Inference.
    """
    if not isinstance(model, (EPAMNet, RGBStream, PoseStream)):
        raise TypeError(f"optimize_for_inference: expected an EPAMNet, RGBStream or PoseStream, got "
                        f"{type(model).__name__}")
    check_memory_format(memory_format, "optimize_for_inference")
    dtype = _resolve_dtype(dtype)
    fast = copy.deepcopy(model).eval()
    for module in fast.modules():
        if isinstance(module, ConvBNAct):
            module.conv = _fold(module.conv, module.bn)
            module.bn = nn.Identity()
        elif isinstance(module, SpatialTemporalAttention):
            module.spatial_conv = _fold(module.spatial_conv, module.spatial_bn)
            module.spatial_bn = nn.Identity()
        elif isinstance(module, XShiftBlock):
            if isinstance(module.swish, nn.SiLU):
                module.swish = nn.SiLU(inplace=True)
            # With the memory cache the shifted copy costs no fresh allocation: one pass over the block's input
            # instead of shifting it in place and restoring it.
            module.inplace_shift = not cache_memory
            module.folded = True  # its ConvBNActs are folded in this loop too (XShiftBlock._forward_folded)
    fast.requires_grad_(False)
    device = next(fast.parameters()).device
    fmt = resolve_memory_format(memory_format, device)
    if fmt is not None:
        fast = fast.to(memory_format=fmt)
    fast.memory_format = memory_format
    if dtype != torch.float32:
        if device.type == "cpu" and not cpu_has_bf16():
            warnings.warn("optimize_for_inference: this CPU has no bfloat16 instructions (avx512_bf16 / amx_bf16): "
                          "bfloat16 inference will be slower than float32 here", RuntimeWarning, stacklevel=2)
        _to_dtype_but_squeeze_excite(fast, dtype)
        fast.register_forward_pre_hook(_inputs_to(dtype, fmt))
        fast.register_forward_hook(_outputs_to_float32)
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        # The folded convolutions' weights in oneDNN's layout, now: conv_act would otherwise reorder them on every
        # call (epamx.nn.conv_act.pack_weight), and packing inside a forward would take buffers of the memory cache.
        for module in fast.modules():
            if isinstance(module, ConvBNAct) and module.conv.weight.dtype in (torch.float32, torch.bfloat16):
                pack_weight(module.conv, module.frame_wise and fmt == torch.channels_last_3d)
    if cache_memory:
        hooks = _CpuCacheHooks()
        fast.register_forward_pre_hook(hooks.before, prepend=True)
        fast.register_forward_hook(hooks.after, always_call=True)
    return fast
