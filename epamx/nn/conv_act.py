"""A convolution with what follows it (bias, activation, a residual sum) as one oneDNN call: inference on a CPU.

After batch norm is folded into the convolutions (epamx.models.optimize_for_inference), each activation and each
residual sum would be a pass of its own over a tensor the convolution has just written; oneDNN applies them as the
convolution's post-ops while the output is still in cache. What it buys: docs/performance.md, Inference.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["CONV_ACTIVATIONS", "as_frames", "conv_act", "from_frames", "fused_conv_act_applies", "pack_weight"]

CONV_ACTIVATIONS = ("none", "relu", "swish")

_HAS_MKLDNN = torch.backends.mkldnn.is_available()  # whether this build of PyTorch has oneDNN: fixed
_DTYPES = (torch.float32, torch.bfloat16)
_ONEDNN_BF16: Optional[bool] = None  # _onednn_runs_bfloat16(), found at its first call


def _onednn_runs_bfloat16() -> bool:
    """Whether this CPU has what oneDNN's bfloat16 convolutions need (AVX-512 BW, VL and DQ, or AVX-NE-CONVERT):
    PyTorch refuses them elsewhere (an AVX2-only CPU, say), where conv_act runs bfloat16 through float32."""
    global _ONEDNN_BF16
    if _ONEDNN_BF16 is None:
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        _ONEDNN_BF16 = _HAS_MKLDNN and check is not None and bool(check())
    return _ONEDNN_BF16


def _widens(dtype: torch.dtype) -> bool:
    """Whether conv_act runs ``dtype`` through oneDNN's float32 convolution: bfloat16 where oneDNN's bfloat16 path
    is refused. The input is widened to float32 and the weight packed as float32 (both exactly: bfloat16 values),
    and the output rounded to bfloat16: what the bfloat16 path computes (it too accumulates in float32), at
    float32's speed plus two conversions, where PyTorch's own bfloat16 convolutions there are about 40x slower
    than float32 (measured on an AVX2 AMD EPYC: docs/performance.md, bfloat16)."""
    return dtype == torch.bfloat16 and not _onednn_runs_bfloat16()


def fused_conv_act_applies(conv: nn.Conv3d, x: Tensor) -> bool:
    """Whether :func:`conv_act` runs ``conv`` on x as one oneDNN call: inference (no gradients) on a CPU tensor of
    float32 or bfloat16 with the weight's dtype, oneDNN present, outside torch.compile (inductor makes the same
    fusions itself)."""
    return (_HAS_MKLDNN and not torch.is_grad_enabled() and x.dtype in _DTYPES and x.device.type == "cpu"
            and conv.weight.dtype == x.dtype and not torch.compiler.is_compiling())


def as_frames(x: Tensor) -> Tensor:
    """(N, C, T, H, W) in channels_last_3d memory as the channels-last (N*T, C, H, W) batch of its frames (a view)."""
    n, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)


def from_frames(y: Tensor, n: int) -> Tensor:
    """The inverse of :func:`as_frames` for a batch of ``n`` clips: (N*T, C, H, W) -> (N, C, T, H, W) (a view)."""
    return y.view(n, y.shape[0] // n, *y.shape[1:]).permute(0, 2, 1, 3, 4)


# Each convolution's weight in the layout oneDNN's kernel reads (prepacked): without it every call queried that
# layout and reordered the weight again, 11-21 us per call (5-12% of a 1x1x1 convolution of EPAM-Net's last stages
# at one clip; 158 calls per forward). Kept beside the module, not in it (an opaque oneDNN tensor can be neither
# deep-copied nor saved), with what it was made from, and remade when the weight changed (in place, moved or
# converted). The layout does not depend on the input's size (measured: packing for the real input, for none or
# for a 1x1x1 one ran alike), so weights are packed without one.
_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _kernel_args(conv: nn.Module, frame_wise: bool):
    """The weight, stride, padding and dilation oneDNN's convolution takes for ``conv``: as they are, or for its
    frames (a 2D weight and the spatial parts) where ``frame_wise``."""
    if frame_wise:
        return conv.weight.squeeze(2), conv.stride[1:], conv.padding[1:], conv.dilation[1:]
    return conv.weight, conv.stride, conv.padding, conv.dilation


def _packed_args(conv: nn.Conv3d, frame_wise: bool) -> tuple:
    """(packed weight, stride, padding, dilation) for conv_act's oneDNN call, from conv's entry in _PACKED, made
    anew where its weight changed since. One lookup per call: the checks that the weight is the same are a few
    attribute reads, where unpacking the geometry again cost two more dispatched ops per frame-wise call."""
    source = conv.weight
    # An inference tensor (made under torch.inference_mode) has no version counter: its storage alone identifies it.
    key = (source.data_ptr(), None if source.is_inference() else source._version, source.dtype, frame_wise)
    entry = _PACKED.get(conv)
    if entry is not None and entry[0] == key:
        return entry[1:]
    weight, stride, padding, dilation = _kernel_args(conv, frame_wise)
    reorder = torch._C._nn.mkldnn_reorder_conv3d_weight if weight.dim() == 5 else \
        torch._C._nn.mkldnn_reorder_conv2d_weight
    with torch.no_grad():
        if _widens(weight.dtype):
            weight = weight.float()
        packed = reorder(weight.to_mkldnn(), list(padding), list(stride), list(dilation), conv.groups, None)
    entry = (key, packed, list(stride), list(padding), list(dilation))
    _PACKED[conv] = entry
    return entry[1:]


def pack_weight(conv: nn.Conv3d, frame_wise: bool = False) -> Tensor:
    """conv's weight (as :func:`conv_act` passes it: squeezed to 2D where ``frame_wise``) in oneDNN's layout for
    it, made once per weight and reused by :func:`conv_act` on a CPU. epamx.models.optimize_for_inference packs
    every folded convolution's weight up front (outside any memory-cache scope, so the packed weights do not take
    activation buffers); others are packed at their first call."""
    return _packed_args(conv, frame_wise)[0]


def conv_act(conv: nn.Conv3d, x: Tensor, activation: str = "none", add: Optional[Tensor] = None,
             frame_wise: bool = False) -> Tensor:
    """``activation(conv(x) + add)`` (``add`` optional, of the output's shape) as one oneDNN convolution with
    post-ops; ``activation`` one of :data:`CONV_ACTIVATIONS` ("swish" is SiLU; after a sum "none" or "relu"). ``frame_wise``: a (1, kh, kw)
    convolution over x in channels_last_3d memory, run as a 2D convolution over its frames (no copy). Call it where
    :func:`fused_conv_act_applies`; the output is a new tensor of x's dtype. bfloat16 on a CPU where PyTorch refuses
    oneDNN's bfloat16 path (an AVX2-only one) runs through its float32 convolution, rounded to bfloat16 after."""
    if activation not in CONV_ACTIVATIONS:
        raise ValueError(f"conv_act: activation must be one of {', '.join(CONV_ACTIVATIONS)}, got {activation!r}")
    if add is not None and activation == "swish":  # oneDNN's binary post-op takes ReLU alone after the sum
        raise ValueError("conv_act: after a sum (add=...) the activation must be 'none' or 'relu'")
    if torch.jit.is_tracing():
        weight, stride, padding, dilation = _kernel_args(conv, frame_wise)
    else:
        weight, stride, padding, dilation = _packed_args(conv, frame_wise)
    n, bias, dtype = x.shape[0], conv.bias, x.dtype
    widen = _widens(dtype)
    if widen:
        x, add = x.float(), add.float() if add is not None else None
        bias = bias.float() if bias is not None else None
        if weight.dtype != torch.float32:  # traced (conv's own weight, not the packed one)
            weight = weight.float()
    if frame_wise:
        x = as_frames(x)
        add = as_frames(add) if add is not None else None
    if add is None:
        y = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, conv.groups,
                                                    activation, [], None)
    else:
        y = torch.ops.mkldnn._convolution_pointwise.binary(x, add, weight, bias, padding, stride, dilation,
                                                           conv.groups, "add", None,
                                                           None if activation == "none" else activation, [], None)
    if widen:
        y = y.to(dtype)
    return from_frames(y, n) if frame_wise else y
