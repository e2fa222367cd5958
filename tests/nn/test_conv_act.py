"""conv_act: a convolution with its activation and residual sum as one oneDNN call, against the separate ops."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from epamx.nn import conv_act, fused_conv_act_applies
from testkit import without_onednn_bfloat16

conv_act_module = importlib.import_module("epamx.nn.conv_act")  # the module (epamx.nn.conv_act is the function)

CL = torch.channels_last_3d
ACTS = {"none": lambda y: y, "relu": F.relu, "swish": F.silu}


def _conv(kernel, groups=1, channels=(8, 16), dtype=torch.float32, stride=1):
    torch.manual_seed(0)
    padding = tuple(k // 2 for k in kernel)
    conv = nn.Conv3d(channels[0], channels[1], kernel, stride=stride, padding=padding, groups=groups, bias=True)
    return conv.to(dtype=dtype, memory_format=CL).eval()


def _input(channels=8, dtype=torch.float32, shape=(2, 5, 9, 11)):
    g = torch.Generator().manual_seed(1)
    n, t, h, w = shape
    return torch.randn(n, channels, t, h, w, generator=g).to(dtype=dtype, memory_format=CL)


@pytest.mark.parametrize("activation", ["none", "relu", "swish"])
@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_conv_then_add_then_activation(activation, with_add, dtype):
    conv = _conv((1, 1, 1), dtype=dtype)
    x = _input(dtype=dtype)
    add = _input(16, dtype=dtype) if with_add else None
    if with_add and activation == "swish":
        with torch.no_grad(), pytest.raises(ValueError, match="after a sum"):
            conv_act(conv, x, activation, add)
        return
    with torch.no_grad():
        assert fused_conv_act_applies(conv, x)
        got = conv_act(conv, x, activation, add)
        y = conv(x).float()
        want = ACTS[activation](y + add.float() if with_add else y)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, **tol)


@pytest.mark.parametrize("stride", [1, 2])
def test_frame_wise_depthwise_matches_conv3d(stride):
    conv = _conv((1, 3, 3), groups=8, channels=(8, 8), stride=(1, stride, stride))
    x = _input()
    with torch.no_grad():
        got = conv_act(conv, x, "swish", frame_wise=True)
        want = F.silu(conv(x))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_applies_only_to_cpu_inference_in_the_weights_dtype():
    conv = _conv((1, 1, 1))
    x = _input()
    assert not fused_conv_act_applies(conv, x)  # gradients enabled
    with torch.no_grad():
        assert fused_conv_act_applies(conv, x)
        assert not fused_conv_act_applies(conv, x.double())
        assert not fused_conv_act_applies(conv, x.bfloat16())


def test_bad_activation_is_explained():
    with torch.no_grad(), pytest.raises(ValueError, match="conv_act: activation must be one of"):
        conv_act(_conv((1, 1, 1)), _input(), "gelu")


def test_packed_weights_are_reused_and_remade_when_the_weight_changes():
    """conv_act runs on the weight packed in oneDNN's layout (epamx.nn.conv_act.pack_weight): the same packed tensor
    call after call, bit for bit the unpacked convolution; changed in place, converted to bfloat16 or run
    frame-wise (a 2D weight), it is packed again, and the results follow the new weight."""
    import copy

    from epamx.nn.conv_act import _PACKED, pack_weight
    conv = _conv((1, 3, 3), groups=8, channels=(8, 8))
    x = _input()
    with torch.no_grad():
        first = conv_act(conv, x, "relu")
        packed = _PACKED[conv][1]
        assert conv_act(conv, x, "relu").equal(first) and _PACKED[conv][1] is packed
        assert pack_weight(conv) is packed
        want = F.relu(torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, conv.padding, conv.stride,
                                                              conv.dilation, conv.groups, "none", [], None))
        assert first.equal(want)
        conv.weight.mul_(2)  # in place: a new version
        torch.testing.assert_close(conv_act(conv, x, "relu"), F.relu(conv(x)), rtol=1e-5, atol=1e-5)
        assert _PACKED[conv][1] is not packed
        frames = conv_act(conv, x, "relu", frame_wise=True)  # the 2D weight
        torch.testing.assert_close(frames, F.relu(conv(x)), rtol=1e-5, atol=1e-5)
        clone = copy.deepcopy(conv)  # the packed weight stays outside the module
        torch.testing.assert_close(conv_act(clone, x, "relu"), F.relu(conv(x)), rtol=1e-5, atol=1e-5)
        conv.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        torch.testing.assert_close(conv_act(conv, xb, "relu").float(), F.relu(conv(xb)).float(), rtol=2e-2, atol=2e-2)
    with torch.inference_mode():  # weights made here are inference tensors, without a version counter
        made = _conv((1, 1, 1))
        torch.testing.assert_close(conv_act(made, x, "relu"), F.relu(made(x)), rtol=1e-5, atol=1e-5)


def test_knows_whether_onednn_runs_bfloat16_here():
    """As PyTorch's own check says (AVX-512 BW/VL/DQ or AVX-NE-CONVERT): where the check were gone, every CPU would
    take the widened bfloat16 route below."""
    assert conv_act_module._onednn_runs_bfloat16() == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert conv_act_module._widens(torch.bfloat16) != torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert not conv_act_module._widens(torch.float32)


@pytest.mark.parametrize("kernel,groups,frame_wise", [((1, 1, 1), 1, False), ((1, 3, 3), 8, True),
                                                      ((3, 3, 3), 2, False)])
@pytest.mark.parametrize("activation,with_add", [("none", False), ("relu", False), ("swish", False),
                                                 ("none", True), ("relu", True)])
def test_bfloat16_without_onednn_bfloat16_runs_through_float32(kernel, groups, frame_wise, activation, with_add):
    """bfloat16 where oneDNN's bfloat16 path is refused: the float32 convolution of the same (bfloat16) values with
    its post-ops, rounded to bfloat16 once: bit for bit oneDNN's unpacked float32 call, and within bfloat16's
    rounding of the separate bfloat16 ops."""
    channels = (8, 8) if groups == 8 else (8, 16)
    conv = _conv(kernel, groups=groups, channels=channels, dtype=torch.bfloat16)
    x = _input(dtype=torch.bfloat16)
    add = _input(channels[1], dtype=torch.bfloat16) if with_add else None
    with torch.no_grad(), without_onednn_bfloat16() as module:
        assert fused_conv_act_applies(conv, x)
        got = conv_act(conv, x, activation, add, frame_wise=frame_wise)
        packed = module._PACKED[conv][1]
        assert packed.dtype == torch.float32 and module.pack_weight(conv, frame_wise) is packed
        args = (conv.weight.float(), conv.bias.float(), conv.padding, conv.stride, conv.dilation, conv.groups)
        if with_add:
            exact = torch.ops.mkldnn._convolution_pointwise.binary(
                x.float(), add.float(), *args, "add", None, None if activation == "none" else activation, [], None)
        else:
            exact = torch.ops.mkldnn._convolution_pointwise(x.float(), *args, activation, [], None)
        y = conv(x)
        separate = ACTS[activation](y + add if with_add else y)
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape and got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, exact.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(got.float(), separate.float(), rtol=2e-2, atol=2e-2)
