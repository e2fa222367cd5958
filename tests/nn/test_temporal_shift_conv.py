"""TemporalShift.conv: conv(shift(x)) without a shifted copy, against the plain composition."""
from types import SimpleNamespace

import pytest
import torch

from epamx.nn import TemporalShift


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d],
                         ids=["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_the_composition_and_leaves_x_alone(memory_format, bias):
    torch.manual_seed(0)
    shift = TemporalShift(fold_div=4)
    conv = torch.nn.Conv3d(8, 5, 1, bias=bias).double().to(memory_format=memory_format)
    base = torch.randn(2, 8, 5, 4, 3, dtype=torch.float64).contiguous(memory_format=memory_format)
    x = (base * 1).requires_grad_()  # not a leaf: it stands for the block input others also save
    y = x * 1
    version, before = y._version, y.detach().clone()
    out = shift.conv(conv, y)
    assert torch.equal(y, before) and y._version == version
    want = conv(shift(x * 1))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    weight = torch.randn_like(out)
    params = [x, *conv.parameters()]
    got = torch.autograd.grad((out * weight).sum(), params)
    assert torch.equal(y, before) and y._version == version
    expected = torch.autograd.grad((want * weight).sum(), params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    torch.manual_seed(0)
    shift = TemporalShift(fold_div=3)
    x = torch.randn(2, 6, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        conv = SimpleNamespace(weight=w, bias=b, stride=(1, 1, 1), padding=(0, 0, 0), dilation=(1, 1, 1), groups=1)
        return shift.conv(conv, x * 1)

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_reference_module_and_compile_fall_back():
    shift = TemporalShift(fold_div=4, fused=False)
    conv = torch.nn.Conv3d(8, 5, 1).double()
    x = torch.randn(1, 8, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(shift.conv(conv, x), conv(shift(x)))
