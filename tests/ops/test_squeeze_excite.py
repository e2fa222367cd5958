"""channel_sums and gate_silu_ (squeeze-and-excitation with Swish in inference, CPU) against plain PyTorch: sums in
float64, F.silu of the gated input; layouts, odd sizes, dtypes, in-place semantics, determinism, opcheck, compile,
bad input; and the model's inference copy against the model."""
import pytest
import torch
import torch.nn.functional as F

from epamx.ops import channel_sums, channel_sums_reference, gate_silu_, gate_silu_reference
from testkit import TOLERANCES, poisoned_allocations, raises_naming

# (N, C, ...): EPAM-Net's SE blocks (C = 54, 108, 216, 432 in channels-last: C not a multiple of the kernels'
# 8 or 16 lanes, whole vectors over the pixel stream); odd C and positions, fewer positions than one 256-block
# and several blocks with a partial last one; 4-D and 3-D inputs; a single channel; C > the lcm period's usual.
SHAPES = [(1, 54, 6, 7, 7), (2, 108, 3, 5, 9), (1, 432, 2, 7, 7), (3, 5, 4, 3, 2), (2, 17, 300), (1, 1, 5, 5),
          (2, 33, 16, 14, 14), (1, 3, 1, 1, 1), (2, 37, 5, 13), (2, 54, 5, 14, 15)]
LAYOUTS = ["contiguous", "channels_last", "transposed"]


def _id(shape):
    return "x".join(map(str, shape))


def make(shape, dtype=torch.float32, layout="contiguous", seed=0):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    if layout == "channels_last" and x.dim() in (4, 5):
        return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    if layout == "transposed" and x.dim() >= 3:  # strided: neither dense layout
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_gate(shape, dtype, seed=1):
    return torch.rand(shape[:2], generator=torch.Generator().manual_seed(seed), dtype=torch.float64).mul(1.5) \
        .to(acc_dtype(dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_channel_sums_matches_reference(shape, layout, dtype):
    x = make(shape, dtype, layout)
    with poisoned_allocations():
        out = channel_sums(x)
    expected = x.double().sum(dim=tuple(range(2, x.dim())))
    assert out.shape == shape[:2] and out.dtype == acc_dtype(dtype)
    count = x.numel() // (shape[0] * shape[1])
    # float32 accumulation within a 256-block, blocks in float64: error grows with the block, not with S
    rtol, atol = (1e-12, 1e-12 * count) if dtype == torch.float64 else (1e-6, 1e-6 * min(count, 256) * 3)
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(channel_sums_reference(x).double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_gate_silu_matches_reference(shape, layout, dtype):
    x = make(shape, dtype, layout)
    gate = make_gate(shape, dtype)
    expected = gate_silu_reference(x.double(), gate.double())
    y = x.clone()
    strides = y.stride()
    returned = gate_silu_(y, gate)
    assert returned is y and y.stride() == strides and y.dtype == dtype
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(gate_silu_reference(x, gate).double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_silu_without_a_gate_matches_reference(shape, layout, dtype):
    x = make(shape, dtype, layout)
    expected = F.silu(x.double())
    y = gate_silu_(x.clone())
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(gate_silu_reference(x).double(), expected, rtol=rtol, atol=atol)


def test_gate_silu_over_the_activations_range():
    """Every input the fast exp and reciprocal meet: large negative (exp overflows to inf: -0), large positive,
    tiny, zero, and NaN, against F.silu in float64, in float32 and bfloat16 (bfloat16's rounding to nearest even
    and its NaN included)."""
    values = torch.tensor([-1e4, -100.0, -88.8, -30.0, -5.0, -1.0, -1e-3, -1e-30, 0.0, 1e-30, 1e-3, 0.5, 1.0, 5.0,
                           30.0, 89.0, 1e4, float("nan"), float("inf"), -float("inf")]).double()
    values = torch.cat([values, torch.linspace(-90, 90, 200001, dtype=torch.float64)])  # every exponent's range
    for dtype in (torch.float32, torch.bfloat16):
        x = values.to(dtype).view(1, 1, -1)
        gate = torch.ones(1, 1)
        y = gate_silu_(x.clone(), gate)
        expected = F.silu(x.double()).to(dtype)
        if dtype == torch.float32:
            # within 4 ulp (the AVX-512 exp and reciprocal measured 2.7 at most); where exp(-z) overflows float32
            # (z < -88.7) the result is -0 against |silu| < 3e-37
            torch.testing.assert_close(y, expected, rtol=4.8e-7, atol=1e-36, equal_nan=True)
        else:
            assert_close_bf16(y, x)


def assert_close_bf16(y, x):
    """bfloat16: the kernel's float32 silu rounded to nearest even equals F.silu in float32 rounded, up to one
    bfloat16 ulp where the float32 results straddle a rounding boundary."""
    expected = F.silu(x.float())
    torch.testing.assert_close(y.float(), expected.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-37,
                               equal_nan=True)


@pytest.mark.parametrize("gated", [False, True], ids=["silu", "gated"])
def test_bfloat16_silu_rounds_like_f_silu_almost_everywhere(gated):
    """bfloat16's cheaper SiLU (1.3e-4 before rounding) gives F.silu's rounded value but for a small fraction of
    values, one bfloat16 ulp away (measured 0.6-0.7% on this distribution; more would mean a worse approximation)."""
    x = make((2, 54, 8, 28, 28), torch.bfloat16, "channels_last")
    gate = make_gate(x.shape, torch.bfloat16) if gated else None
    y = gate_silu_(x.clone(), gate)
    expected = gate_silu_reference(x.double(), gate.double() if gated else None).to(torch.bfloat16)
    differ = (y != expected).double().mean().item()
    assert differ < 0.015, f"{differ:.2%} of values differ from F.silu's rounded result"
    torch.testing.assert_close(y.float(), expected.float(), rtol=2 ** -7, atol=1e-37)


@pytest.mark.parametrize("shape", [(2, 54, 6, 7, 7), (1, 5, 300)], ids=_id)
def test_channel_sums_do_not_depend_on_the_thread_count(shape):
    x = make(shape, torch.float32, "channels_last")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = channel_sums(x)
        torch.set_num_threads(max(2, threads))
        many = channel_sums(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_empty_inputs():
    x = torch.randn(2, 3, 0, 4)
    assert torch.equal(channel_sums(x), torch.zeros(2, 3))
    assert gate_silu_(x, torch.ones(2, 3)).shape == x.shape


def test_opcheck():
    x = make((2, 5, 3, 4, 3), torch.float32, "channels_last")
    gate = make_gate(x.shape, torch.float32)
    torch.library.opcheck(torch.ops.epamx.channel_sums.default, (x,))
    torch.library.opcheck(torch.ops.epamx.gate_silu_.default, (x.clone(), gate))
    torch.library.opcheck(torch.ops.epamx.gate_silu_.default, (x.clone(), None))


def test_compile_fullgraph():
    x = make((2, 5, 3, 4, 3), torch.float32, "channels_last")
    gate = make_gate(x.shape, torch.float32)

    def fn(x, gate):
        return gate_silu_(x.clone(), gate) + channel_sums(x).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, gate), fn(x, gate))


def test_bad_input():
    x = torch.randn(2, 5, 3)
    with raises_naming(ValueError, "channel_sums", "x"):
        channel_sums(torch.randn(5))
    with raises_naming(TypeError, "channel_sums", "x"):
        channel_sums(torch.ones(2, 3, dtype=torch.int64))
    with raises_naming(ValueError, "gate_silu_", "gate", "(2, 5)"):
        gate_silu_(x, torch.ones(2, 4))
    with raises_naming(TypeError, "gate_silu_", "gate", "Float"):
        gate_silu_(x, torch.ones(2, 5, dtype=torch.float64))
    with raises_naming(RuntimeError, "gate_silu_", "gradient"):
        gate_silu_(x.clone().requires_grad_(), torch.ones(2, 5))


def test_bfloat16_rounding_with_and_without_the_cpus_bfloat16_instructions():
    """gate_silu_'s bfloat16 pass rounds with vcvtneps2bf16 where the CPU has AVX512-BF16 and with integer arithmetic
    elsewhere (EPAMX_DISABLE_AVX512_BF16=1 forces it): the two give the same bits for every value but float32
    denormals (the instruction reads them as zero)."""
    import subprocess
    import sys
    script = ("import torch, epamx; g = torch.Generator().manual_seed(0); "
              "x = (torch.randn(2, 54, 3, 7, 7, generator=g) * 4).to(torch.bfloat16)"
              ".contiguous(memory_format=torch.channels_last_3d); "
              "flat = x.permute(0, 2, 3, 4, 1).view(-1); "
              "flat[:4] = torch.tensor([float('nan'), float('inf'), -float('inf'), 0.0]); "
              "gate = torch.rand(2, 54, generator=g) * 2; epamx.ops.gate_silu_(x, gate); "
              "print(flat.view(torch.int16).tolist())")
    outputs = []
    for flag in ("0", "1"):
        env = dict(__import__("os").environ, EPAMX_DISABLE_AVX512_BF16=flag)
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        outputs.append(run.stdout)
    assert outputs[0] == outputs[1]
