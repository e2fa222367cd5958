"""X-ShiftNet: X3D-style bottleneck blocks with 2D (1x3x3 depthwise) convolutions and a temporal shift in front of
every block, the backbone of both EPAM-Net streams (docs/epamnet.md; the authors' X3DTemporalShift).

Module and parameter names follow the authors' code (mmcv ConvModule: ``.conv`` + ``.bn``), so their checkpoints
load with a few renames (epamx.models.load_authors_checkpoint).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from epamx.nn import TemporalShift, batch_norm_act, conv_act, fused_batch_norm_applies, fused_conv_act_applies
from epamx.nn.conv_act import as_frames, from_frames
from epamx.ops import channel_sums, gate_silu_, temporal_shift


def _frame_wise_conv(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """A (1, kh, kw) Conv3d over (N, C, T, H, W) in channels_last_3d memory, computed as a Conv2d over the N*T
    frames: in that memory the frames are already a channels-last (N*T, C, H, W) batch, so no copy is made either
    way, and the weight (O, I, 1, kh, kw) is a channels-last (O, I, kh, kw) view."""
    y = F.conv2d(as_frames(x), conv.weight.squeeze(2), conv.bias, conv.stride[1:], conv.padding[1:],
                 conv.dilation[1:], conv.groups)
    return from_frames(y, x.shape[0])


class ConvBNAct(nn.Module):
    """Conv3d (no bias) + BatchNorm3d + optional ReLU, named like mmcv's ConvModule.

    ``frame_wise``: where the input and the weight are in channels_last_3d memory, run a (1, kh, kw) convolution
    (temporal stride 1, no temporal padding) as a 2D convolution over the frames (same result). The stems and the
    blocks' depthwise convolutions use it; why: docs/performance.md, X-ShiftNet blocks.

    ``fused``: in training on a CPU, batch norm and ReLU run as one epamx op (epamx.nn.batch_norm_act); False
    keeps the plain modules.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, stride=1, padding=0, groups: int = 1,
                 relu: bool = True, frame_wise: bool = False, fused: bool = True):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm3d(out_channels)
        self.activate = nn.ReLU(inplace=True) if relu else None
        self.frame_wise = frame_wise and self.conv.kernel_size[0] == 1 and self.conv.stride[0] == 1 \
            and self.conv.padding[0] == 0
        self.fused = fused

    def _runs_frame_wise(self, x: Tensor) -> bool:
        return self.frame_wise and x.is_contiguous(memory_format=torch.channels_last_3d) and \
            self.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)

    def convolve(self, x: Tensor) -> Tensor:
        """The convolution alone."""
        if self._runs_frame_wise(x):
            return _frame_wise_conv(self.conv, x)
        return self.conv(x)

    def folded_applies(self, x: Tensor) -> bool:
        """Whether this module's batch norm is folded away (optimize_for_inference) and the convolution, with what
        follows it, runs as one oneDNN call (epamx.nn.conv_act)."""
        return isinstance(self.bn, nn.Identity) and fused_conv_act_applies(self.conv, x)

    def conv_act(self, x: Tensor, activation: str, add: Optional[Tensor] = None) -> Tensor:
        """``activation(conv(x) + add)`` as one call, where :meth:`folded_applies`."""
        return conv_act(self.conv, x, activation, add, frame_wise=self._runs_frame_wise(x))

    def forward(self, x: Tensor) -> Tensor:
        if self.folded_applies(x):
            return self.conv_act(x, "relu" if self.activate is not None else "none")
        x = self.convolve(x)
        if self.fused and fused_batch_norm_applies(self.bn, x):
            return batch_norm_act(self.bn, x, "relu" if self.activate is not None else "identity")
        x = self.bn(x)
        return self.activate(x) if self.activate is not None else x


def _round_width(width: float, multiplier: float, min_width: int = 8, divisor: int = 8) -> int:
    """X3D's channel rounding: to a multiple of `divisor`, at least `min_width`, never below 90% of the target."""
    width *= multiplier
    rounded = max(min_width, int(width + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * width:
        rounded += divisor
    return int(rounded)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation over channels with X3D's rounded bottleneck."""

    def __init__(self, channels: int, ratio: float):
        super().__init__()
        self.bottleneck = _round_width(channels, ratio)
        self.fc1 = nn.Conv3d(channels, self.bottleneck, kernel_size=1)
        self.fc2 = nn.Conv3d(self.bottleneck, channels, kernel_size=1)

    def gate(self, pooled: Tensor) -> Tensor:
        """The per-sample channel factors (N, C) from the channel means (N, C)."""
        n, c = pooled.shape
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(pooled.view(n, c, 1, 1, 1))))).view(n, c)

    def forward(self, x: Tensor) -> Tensor:
        # The MLP in its weights' dtype: float32 in optimize_for_inference's bfloat16 copy (a no-op cast elsewhere).
        pooled = x.mean(dim=(2, 3, 4), keepdim=True).to(self.fc1.weight.dtype)
        scale = torch.sigmoid(self.fc2(torch.relu(self.fc1(pooled))))
        return x * scale.to(x.dtype)

    def forward_(self, x: Tensor) -> Tensor:
        """:meth:`forward` in place, for inference (x not needed for a gradient): x is multiplied by its gate and
        returned. The same function, computed faster: channel sums / count (PyTorch's bfloat16 ``mean`` over these
        dimensions runs several times slower) and the 1x1x1 convolutions as the linear maps they are (on
        (N, C, 1, 1, 1) PyTorch's convolution takes a slow path). Training keeps :meth:`forward`'s exact
        arithmetic, whose rounding the shipped results were trained with."""
        n, c, t, h, w = x.shape
        return x.mul_(self._linear_gate(x.sum(dim=(2, 3, 4)), 1 / (t * h * w)).view(n, c, 1, 1, 1))

    def _linear_gate(self, sums: Tensor, scale: float) -> Tensor:
        """:meth:`gate` of the means ``sums * scale``, with the 1x1x1 convolutions as linear maps (the scale folded
        into the first), in the weights' dtype, for inference (:meth:`forward_`, :meth:`forward_silu_`)."""
        sums = sums.to(self.fc1.weight.dtype)
        hidden = torch.addmm(self.fc1.bias, sums, self.fc1.weight.flatten(1).t(), alpha=scale).relu_()
        return torch.addmm(self.fc2.bias, hidden, self.fc2.weight.flatten(1).t()).sigmoid_()

    def forward_silu_(self, x: Tensor) -> Tensor:
        """``silu(forward(x))`` in place, for inference on a CPU (x not needed for a gradient): the channel sums
        and the gating with Swish each one pass of an epamx op (epamx.ops.channel_sums, gate_silu_), the MLP in
        the weights' dtype as in :meth:`forward_` (float32 in optimize_for_inference's bfloat16 copy, which
        takes the float32 sums and gives the float32 gate that gate_silu_ reads without a conversion)."""
        n, c = x.shape[:2]
        gate = self._linear_gate(channel_sums(x), 1 / (x.numel() // (n * c)))
        return gate_silu_(x, gate.to(torch.float64 if x.dtype == torch.float64 else torch.float32))


class XShiftBlock(nn.Module):
    """shift -> 1x1x1 conv+BN+ReLU -> (1,3,3) depthwise conv+BN (spatial stride) -> [SE] -> Swish -> 1x1x1 conv+BN,
    plus the unshifted input (through a 1x1x1 conv+BN where the shape changes), then ReLU.

    When the input needs no gradient (inference) and the shift is fused, outside torch.compile, the input is
    shifted in place around the first convolution and restored exactly afterwards; the result is bit for bit the
    same. Set ``inplace_shift = False`` to always allocate the shifted copy (optimize_for_inference does, where
    its memory cache makes the copy cheaper than shifting and restoring).

    In training on a CPU with ``fused`` (the default), each batch norm runs fused with what follows it
    (epamx.nn.batch_norm_act): ReLU after the first, SE and Swish after the depthwise convolution; and the shift
    is done in place around the first convolution in the backward pass too (TemporalShift.conv). The depthwise
    convolution runs frame by frame in channels_last_3d memory (ConvBNAct's ``frame_wise``). What these buy:
    docs/performance.md, X-ShiftNet blocks and the fused training path.
    """

    # Set on the block by optimize_for_inference, which folds every batch norm of the block into its convolution
    # (a class attribute: blocks saved before it existed read False).
    folded: bool = False

    def __init__(self, in_channels: int, planes: int, out_channels: int, spatial_stride: int = 1, fold_div: int = 8,
                 se_ratio: Optional[float] = None, use_swish: bool = True, fused: bool = True):
        super().__init__()
        self.shift = TemporalShift(fold_div, fused=fused)
        self.conv1 = ConvBNAct(in_channels, planes, 1, fused=fused)
        self.conv2 = ConvBNAct(planes, planes, (1, 3, 3), stride=(1, spatial_stride, spatial_stride),
                               padding=(0, 1, 1), groups=planes, relu=False, frame_wise=True, fused=fused)
        self.se_module = SqueezeExcite(planes, se_ratio) if se_ratio is not None else None
        self.swish = nn.SiLU() if use_swish else nn.Identity()
        self.conv3 = ConvBNAct(planes, out_channels, 1, relu=False, fused=fused)
        self.downsample = None
        if spatial_stride != 1 or in_channels != out_channels:
            self.downsample = ConvBNAct(in_channels, out_channels, 1, stride=(1, spatial_stride, spatial_stride),
                                        relu=False, fused=fused)
        self.relu = nn.ReLU(inplace=True)
        self.inplace_shift = True
        self.fused = fused

    def _shift_in_place(self, x: Tensor) -> bool:
        return (self.inplace_shift and self.shift.fused and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and x.requires_grad))

    def _forward_folded(self, x: Tensor) -> Tensor:
        """:meth:`forward` of optimize_for_inference's copy on a CPU without gradients, where every convolution is
        one oneDNN call with what follows it (epamx.nn.conv_act): the same calls the general path below makes for
        that copy, without its per-module dispatch and checks (about 35 us of Python per block, 1-2 ms of a
        one-clip forward; tests/models/test_optimize.py checks the two paths give the same bits)."""
        if self._shift_in_place(x):
            with self.shift.shifted_in_place(x):
                out = conv_act(self.conv1.conv, x, "relu")
        else:
            out = conv_act(self.conv1.conv, temporal_shift(x, self.shift.fold_div), "relu")
        conv2 = self.conv2
        out = conv_act(conv2.conv, out, "none", frame_wise=conv2._runs_frame_wise(out))
        # Swish in epamx's own pass: oneDNN's swish post-op took longer than the convolution itself.
        out = gate_silu_(out) if self.se_module is None else self.se_module.forward_silu_(out)
        identity = x if self.downsample is None else conv_act(self.downsample.conv, x, "none")
        return conv_act(self.conv3.conv, out, "relu", add=identity)

    def _folded_path_applies(self, x: Tensor) -> bool:
        return (self.folded and self.shift.fused and isinstance(self.swish, nn.SiLU) and isinstance(self.relu, nn.ReLU)
                and fused_conv_act_applies(self.conv1.conv, x))

    def forward(self, x: Tensor) -> Tensor:
        if self._folded_path_applies(x):
            return self._forward_folded(x)
        if self._shift_in_place(x):
            with self.shift.shifted_in_place(x):
                out = self.conv1(x)
        elif self.fused and fused_batch_norm_applies(self.conv1.bn, x):
            out = batch_norm_act(self.conv1.bn, self.shift.conv(self.conv1.conv, x), "relu")
        else:
            out = self.conv1(self.shift(x))
        swish = isinstance(self.swish, nn.SiLU)
        if self.se_module is None and swish and self.conv2.folded_applies(out):
            # Swish in epamx's own pass: oneDNN's swish post-op took longer than the convolution itself.
            out = gate_silu_(self.conv2.conv_act(out, "none"))
        elif self.fused and fused_batch_norm_applies(self.conv2.bn, out):
            se = self.se_module
            out = batch_norm_act(self.conv2.bn, self.conv2.convolve(out),
                                 "silu" if swish else "identity",
                                 se.gate if se is not None else None, tuple(se.parameters()) if se is not None else ())
        else:
            out = self.conv2(out)
            # The convolution's fresh output is this block's own: the inference copy (batch norm folded away by
            # optimize_for_inference) gates it in place, on a CPU with Swish in the same pass. A model being
            # trained keeps forward's exact rounding in its evaluations too.
            folded = isinstance(self.conv2.bn, nn.Identity) and not torch.compiler.is_compiling()
            inference = folded and not (torch.is_grad_enabled() and out.requires_grad)
            if self.se_module is not None and inference and swish and out.device.type == "cpu":
                out = self.se_module.forward_silu_(out)
            else:
                if self.se_module is not None:
                    out = self.se_module.forward_(out) if inference else self.se_module(out)
                out = self.swish(out)
        identity = self.downsample(x) if self.downsample is not None else x
        if self.conv3.folded_applies(out) and isinstance(self.relu, nn.ReLU):
            return self.conv3.conv_act(out, "relu", add=identity)
        out = self.conv3(out)
        # out is this block's own fresh tensor, and neither batch norm nor convolution saves its output for
        # backward: adding in place is safe in training too, and saves an allocation.
        return self.relu(out.add_(identity))


# The modules with a ``fused`` switch between epamx's ops and the plain-PyTorch reference path.
FUSED_MODULES = (TemporalShift, ConvBNAct, XShiftBlock)


class XShiftNet(nn.Module):
    """The X-ShiftNet backbone: (1,3,3) stem conv+BN+ReLU, stages of XShiftBlocks, 1x1x1 conv5+BN+ReLU.

    Args:
        in_channels: input channels (3 for RGB, K (+L) heatmap channels for pose).
        base_channels: width of the first stage; stage i has base_channels * 2**i.
        stage_blocks: blocks per stage.
        spatial_strides: the first block of each stage's spatial stride (default 2 everywhere).
        stem_stride: the stem's spatial stride.
        bottleneck_factor: a block's inner width / its output width (X3D's gamma_b); conv5 widens by it too.
        fold_div: temporal shift fold divisor (fold = C // fold_div channels move each way).
        se_style: "half" (SE in blocks 0, 2, 4, ... of a stage), "all", or "none".
        se_ratio: SE bottleneck ratio before X3D's rounding.
        use_swish: Swish after the depthwise convolution.
        fused: the fused epamx ops (temporal shifts; in CPU training, batch norm with what follows it), or False
            for the plain-PyTorch reference path.

    Input (N, C_in, T, H, W), any T, H, W; output (N, feat_dim, T, H', W'), each stride-2 step taking ceil(H / 2).
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 24, stage_blocks: Sequence[int] = (3, 5, 11, 7),
                 spatial_strides: Optional[Sequence[int]] = None, stem_stride: int = 2,
                 bottleneck_factor: float = 2.25, fold_div: int = 8, se_style: str = "half",
                 se_ratio: float = 1 / 16, use_swish: bool = True, fused: bool = True):
        super().__init__()
        spatial_strides = tuple(spatial_strides) if spatial_strides is not None else (2,) * len(stage_blocks)
        if len(spatial_strides) != len(stage_blocks):
            raise ValueError(f"XShiftNet: spatial_strides {spatial_strides} must have one entry per stage "
                             f"(stage_blocks {tuple(stage_blocks)})")
        if se_style not in ("half", "all", "none"):
            raise ValueError(f"XShiftNet: se_style must be 'half', 'all' or 'none', got {se_style!r}")
        self.in_channels = in_channels
        self.conv1_s = ConvBNAct(in_channels, base_channels, (1, 3, 3), stride=(1, stem_stride, stem_stride),
                                 padding=(0, 1, 1), frame_wise=True, fused=fused)
        self.res_layers = []
        width = base_channels
        for i, (blocks, stride) in enumerate(zip(stage_blocks, spatial_strides)):
            out_width = base_channels * 2 ** i
            planes = int(out_width * bottleneck_factor)
            layer = nn.Sequential(*[
                XShiftBlock(width if b == 0 else out_width, planes, out_width, stride if b == 0 else 1, fold_div,
                            se_ratio if se_style == "all" or (se_style == "half" and b % 2 == 0) else None,
                            use_swish, fused)
                for b in range(blocks)])
            self.add_module(f"layer{i + 1}", layer)
            self.res_layers.append(f"layer{i + 1}")
            width = out_width
        self.feat_dim = int(width * bottleneck_factor)
        self.conv5 = ConvBNAct(width, self.feat_dim, 1, fused=fused)
        self.reset_parameters()

    @classmethod
    def rgb(cls, **kwargs) -> "XShiftNet":
        """EPAM-Net's RGB stream: 3 x 16 x 224 x 224 -> 432 x 16 x 7 x 7, 1,980,030 parameters."""
        return cls(**{**dict(in_channels=3, stage_blocks=(3, 5, 11, 7), stem_stride=2, fold_div=8), **kwargs})

    @classmethod
    def pose(cls, in_channels: int = 17, **kwargs) -> "XShiftNet":
        """EPAM-Net's pose stream: 17 x 48 x 56 x 56 -> 216 x 48 x 7 x 7, 519,580 parameters with 17 joints."""
        return cls(**{**dict(in_channels=in_channels, stage_blocks=(5, 11, 7), stem_stride=1, fold_div=4), **kwargs})

    @property
    def fused(self) -> bool:
        return all(m.fused for m in self.modules() if isinstance(m, FUSED_MODULES))

    @fused.setter
    def fused(self, value: bool) -> None:
        for m in self.modules():
            if isinstance(m, FUSED_MODULES):
                m.fused = value

    def reset_parameters(self) -> None:
        """The authors' initialisation: Kaiming-normal convolutions (fan out), batch norm at 1 and 0, and the last
        batch norm of every residual branch at 0, so each block starts as the identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, XShiftBlock):
                nn.init.zeros_(m.conv3.bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"XShiftNet: expected input (N, {self.in_channels}, T, H, W), got shape {tuple(x.shape)}")
        x = self.conv1_s(x)
        for name in self.res_layers:
            x = getattr(self, name)(x)
        return self.conv5(x)
