"""to_channels_last against Tensor.to(dtype, memory_format=channels_last[_3d]): bit for bit, for every pair of
floating dtypes, odd sizes, both ranks, non-contiguous and already channels-last inputs, bfloat16's rounding ties
and non-finite values; opcheck, compile, bad input."""
import pytest
import torch

from epamx.ops import to_channels_last, to_channels_last_reference
from testkit import FLOAT_DTYPES, poisoned_allocations, raises_naming

# The clips (3 RGB channels, 17 heatmaps), one channel, positions fewer than one 256-block and a partial last block,
# 4-D frames.
SHAPES = [(1, 3, 16, 24, 22), (2, 17, 5, 7, 9), (1, 1, 3, 5, 7), (3, 5, 1, 1, 1), (2, 3, 600), (2, 7, 13, 11),
          (1, 33, 2, 9, 17), (2, 3, 3, 17, 19)]
SHAPES = [s for s in SHAPES if len(s) in (4, 5)]


def _id(shape):
    return "x".join(map(str, shape))


def make(shape, dtype=torch.float32, seed=0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 5).to(dtype)


def assert_same(out, expected):
    """Same dtype, shape, values (bit for bit) and channels-last layout (strides of size-1 dims may differ)."""
    fmt = torch.channels_last_3d if out.dim() == 5 else torch.channels_last
    assert out.dtype == expected.dtype and out.shape == expected.shape and out.is_contiguous(memory_format=fmt)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES + [None], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_matches_reference_bit_for_bit(shape, dtype, out_dtype):
    x = make(shape, dtype)
    with poisoned_allocations():
        out = to_channels_last(x, out_dtype)
    assert_same(out, to_channels_last_reference(x, out_dtype))
    fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    assert_same(out, x.to(dtype=out_dtype or dtype, memory_format=fmt))


def test_bfloat16_rounding_and_non_finite_values():
    """Ties round to even, values just above a tie round up, NaN stays NaN, infinities and the largest floats
    (which round to infinity) as ATen converts them: the AVX-512 path and the scalar tail both."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F808001, 0x3F80FFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000,
                         0xFF800000, 0x7FC00000, 0x7F800001, 0x00000001, 0x80000000], dtype=torch.int64)
    values = bits.to(torch.int32).view(torch.float32)
    x = torch.cat([values.repeat(3), make((40,))]).view(1, 1, -1, 1, 1).expand(1, 3, -1, 1, 1).contiguous()
    out = to_channels_last(x, torch.bfloat16)
    expected = x.to(torch.bfloat16, memory_format=torch.channels_last_3d)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


def test_already_in_layout_and_dtype_is_returned():
    x = make((1, 3, 4, 5, 6)).contiguous(memory_format=torch.channels_last_3d)
    assert to_channels_last(x) is x and to_channels_last(x, torch.float32) is x
    assert_same(to_channels_last(x, torch.bfloat16), x.to(torch.bfloat16))


def test_non_contiguous_and_channels_last_inputs():
    x = make((2, 4, 6, 5, 8))[:, :, ::2].transpose(3, 4)
    assert_same(to_channels_last(x, torch.bfloat16), to_channels_last_reference(x, torch.bfloat16))
    y = make((2, 4, 6, 5, 8)).contiguous(memory_format=torch.channels_last_3d)
    assert_same(torch.ops.epamx.to_channels_last(y, torch.float64), to_channels_last_reference(y, torch.float64))


def test_gradients_and_other_devices_use_the_reference():
    x = make((1, 3, 2, 3, 4)).requires_grad_()
    out = to_channels_last(x, torch.float64)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_opcheck():
    torch.library.opcheck(torch.ops.epamx.to_channels_last.default, (make((2, 3, 4, 5, 6)), torch.bfloat16))
    torch.library.opcheck(torch.ops.epamx.to_channels_last.default, (make((2, 5, 7, 3)),))


def test_compile_fullgraph():
    x = make((2, 3, 4, 5, 6))
    compiled = torch.compile(lambda t: torch.ops.epamx.to_channels_last(t, torch.bfloat16) * 2, fullgraph=True,
                             backend="aot_eager")
    assert_same(compiled(x), to_channels_last_reference(x, torch.bfloat16) * 2)


def test_bad_input():
    with raises_naming(ValueError, "to_channels_last", "4-D", "[2, 3, 4]"):
        torch.ops.epamx.to_channels_last(make((2, 3, 4)), None)
    with raises_naming(ValueError, "to_channels_last", "4-D"):
        to_channels_last_reference(make((2, 3)))
    with raises_naming(TypeError, "to_channels_last", "x"):
        torch.ops.epamx.to_channels_last(torch.ones(1, 2, 3, 4, dtype=torch.int32), None)
    with raises_naming(TypeError, "to_channels_last", "dtype"):
        torch.ops.epamx.to_channels_last(make((1, 2, 3, 4)), torch.int64)
