"""affine_act and the training-mode batch_norm_act against their eager compositions (F.batch_norm, the gate,
torch.relu / F.silu): values, gradients, running statistics, layouts, dtypes, gradcheck, opcheck, the CUDA
kernels' thread bodies in shuffled order, bad input."""
import pytest
import torch

from epamx import _C
from epamx.ops.batch_norm_act import (
    ACTIVATIONS,
    affine_act,
    affine_act_reference,
    batch_norm_act,
    batch_norm_act_reference,
)
from testkit import TOLERANCES, poisoned_allocations

ACTS = list(ACTIVATIONS)
# (N, C, T, H, W): odd sizes, C = 1, a single pixel per frame, EPAM-Net's first RGB stage (smaller T).
SHAPES = [(2, 6, 3, 5, 7), (3, 1, 2, 4, 3), (2, 5, 4, 1, 1), (2, 54, 2, 28, 28)]
LAYOUTS = ["contiguous", "channels_last_3d", "transposed"]


def _id(shape):
    return "x".join(map(str, shape))


def make(shape, dtype=torch.float64, device="cpu", seed=0, layout="contiguous", scale=1.0, offset=0.0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale + offset
    x = x.to(device=device, dtype=dtype)
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "transposed":  # neither contiguous nor channels-last: H and W swapped in memory
        return x.transpose(3, 4).contiguous().transpose(3, 4)
    return x


def coefficients(shape, dtype, device, seed=1):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(seed)
    scale = (torch.rand(shape[:2], generator=g) + 0.5) * torch.where(torch.rand(shape[:2], generator=g) < 0.2, -1, 1)
    shift = torch.randn(shape[:2], generator=g) * 0.3
    return scale.to(device=device, dtype=acc), shift.to(device=device, dtype=acc)


class Gate(torch.nn.Module):
    """Squeeze-and-excitation's MLP on (N, C) channel means."""

    def __init__(self, channels, dtype=torch.float64, device="cpu"):
        super().__init__()
        self.fc1 = torch.nn.Linear(channels, 3).to(device=device, dtype=dtype)
        self.fc2 = torch.nn.Linear(3, channels).to(device=device, dtype=dtype)

    def forward(self, pooled):
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(pooled))))


# ---- affine_act ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_affine_act_matches_reference(shape, act, layout, dtype, device):
    x = make(shape, dtype, device, layout=layout)
    scale, shift = coefficients(shape, dtype, device)
    with poisoned_allocations():
        out = affine_act(x, scale, shift, act)
    expected = affine_act_reference(x.double(), scale.double(), shift.double(), act)
    assert out.dtype == dtype and out.shape == x.shape
    if layout == "channels_last_3d" and shape[1] > 1 and shape[2] * shape[3] * shape[4] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_affine_act_backward_matches_reference(act, layout, dtype, device):
    shape = (2, 6, 3, 5, 7)
    x = make(shape, dtype, device, layout=layout)
    scale, shift = coefficients(shape, dtype, device)
    grad = make(shape, dtype, device, seed=3, layout="contiguous")
    leaves = [t.double().requires_grad_() for t in (x, scale, shift)]
    expected = torch.autograd.grad(affine_act_reference(*leaves, act), leaves, grad.double())
    leaves = [t.detach().clone().requires_grad_() for t in (x, scale, shift)]
    with poisoned_allocations():
        actual = torch.autograd.grad(affine_act(*leaves, act), leaves, grad)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual[0].double(), expected[0], rtol=rtol, atol=atol)
    # scale and shift gradients are sums over 105 elements of each (n, c)
    for got, want in zip(actual[1:], expected[1:]):
        torch.testing.assert_close(got.double(), want, rtol=rtol * 10, atol=atol * 100)


@pytest.mark.parametrize("act", ACTS)
def test_affine_act_gradcheck(act, device):
    shape = (2, 3, 2, 3, 2)
    x = make(shape, device=device, layout="channels_last_3d").requires_grad_()
    scale, shift = (t.requires_grad_() for t in coefficients(shape, torch.float64, device))
    assert torch.autograd.gradcheck(lambda *a: affine_act(*a, act), (x, scale, shift))


def test_affine_act_silu_and_relu_edge_values(device):
    x = torch.tensor([[0.0, -0.0, 88.0, -88.0, 100.0, -100.0, float("inf"), float("-inf"), float("nan"), 1e-30]],
                     device=device).view(1, 1, 10)
    one, zero = torch.ones(1, 1, device=device), torch.zeros(1, 1, device=device)
    torch.testing.assert_close(affine_act(x, one, zero, "silu"), torch.nn.functional.silu(x), equal_nan=True)
    torch.testing.assert_close(affine_act(x, one, zero, "relu"), torch.relu(x), equal_nan=True)


def test_affine_act_silu_sweep_float32(device):
    """SiLU and its gradient over float32's useful range, every vector lane and tail: within a few ulp of float64."""
    z = torch.cat([torch.linspace(-95, 95, 40001), torch.randn(4001) * 4]).to(device).view(1, 1, -1)
    grad = torch.rand(z.shape, generator=torch.Generator().manual_seed(3)).to(device) + 0.5
    one, zero = torch.ones(1, 1, device=device), torch.zeros(1, 1, device=device)
    leaf = z.clone().requires_grad_()
    out = affine_act(leaf, one, zero, "silu")
    (dz,) = torch.autograd.grad(out, leaf, grad)
    ref = z.double().requires_grad_()
    want = torch.nn.functional.silu(ref)
    (want_dz,) = torch.autograd.grad(want, ref, grad.double())
    torch.testing.assert_close(out.double(), want, rtol=2e-6, atol=1e-30)
    torch.testing.assert_close(dz.double(), want_dz, rtol=2e-6, atol=1e-6)  # silu' crosses 0 near z = -2.4


# ---- batch_norm_act ------------------------------------------------------------------------------------------------

def _run_bn(fn, x, act, gated, grad, momentum=0.1):
    c = x.shape[1]
    g = torch.Generator().manual_seed(5)
    weight = (torch.rand(c, generator=g) + 0.5).to(x.device, x.dtype).requires_grad_()
    bias = (torch.randn(c, generator=g) * 0.2).to(x.device, x.dtype).requires_grad_()
    running = [torch.randn(c, generator=g).to(x.device, x.dtype) * 0.1, torch.rand(c, generator=g).to(x.device, x.dtype) + 0.5]
    torch.manual_seed(7)
    gate = Gate(c, x.dtype, x.device) if gated else None
    params = tuple(gate.parameters()) if gated else ()
    leaf = x.detach().clone().requires_grad_()
    out = fn(leaf, weight, bias, *running, momentum, 1e-5, act, gate, params)
    inputs = [leaf, weight, bias, *params]
    grads = torch.autograd.grad(out, inputs, grad)
    return out, grads, running


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_batch_norm_act_matches_reference_float64(shape, layout, act, gated, device):
    x = make(shape, torch.float64, device, layout=layout, scale=3.0, offset=2.0)  # a mean well away from 0
    grad = make(shape, torch.float64, device, seed=2)
    out, grads, running = _run_bn(batch_norm_act, x, act, gated, grad)
    out_r, grads_r, running_r = _run_bn(batch_norm_act_reference, x, act, gated, grad)
    torch.testing.assert_close(out, out_r, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, grads_r):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    for got, want in zip(running, running_r):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("act", ACTS)
def test_batch_norm_act_matches_reference_low_precision(act, gated, dtype, device):
    shape = (2, 54, 2, 28, 28)
    x = make(shape, dtype, device, layout="channels_last_3d", scale=2.0, offset=1.0)
    grad = make(shape, dtype, device, seed=2)
    if act == "relu":
        # Where the pre-activation is within rounding of 0 the two sides may take different sides of the kink:
        # no gradient there.
        pre, _, _ = _run_bn(batch_norm_act_reference, x.double(), "identity", gated, grad.double())
        grad = grad.masked_fill(pre.abs() < 1e-3, 0)
    out, grads, _ = _run_bn(batch_norm_act, x, act, gated, grad)
    # the reference in float64 from the same (rounded) inputs
    out_r, grads_r, _ = _run_bn(batch_norm_act_reference, x.double(), act, gated, grad.double())
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), out_r, rtol=rtol, atol=atol * 10)
    for got, want in zip(grads, grads_r):  # sums of thousands of terms: compared to their scale
        err, scale = (got.double() - want).abs().max().item(), want.abs().max().item()
        assert err <= 10 * rtol * scale + atol, (err, scale)


@pytest.mark.parametrize("act", ACTS)
def test_batch_norm_act_gradcheck(act, device):
    shape = (2, 3, 2, 3, 2)
    x = make(shape, device=device, layout="channels_last_3d", offset=0.5).requires_grad_()
    weight = torch.rand(3, dtype=torch.float64, device=device).add(0.5).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, device=device).requires_grad_()
    torch.manual_seed(3)
    gate = Gate(3, device=device)
    params = tuple(gate.parameters())
    assert torch.autograd.gradcheck(
        lambda x, w, b, *p: batch_norm_act(x, w, b, None, None, 0.1, 1e-5, act, gate, p), (x, weight, bias, *params))
    assert torch.autograd.gradcheck(lambda x, w, b: batch_norm_act(x, w, b, None, None, 0.1, 1e-5, act),
                                    (x, weight, bias))


def test_batch_norm_act_without_affine_or_running_stats(device):
    x = make((2, 4, 3, 3, 3), device=device).requires_grad_()
    got = batch_norm_act(x, None, None, None, None, 0.1, 1e-3, "silu")
    want = batch_norm_act_reference(x, None, None, None, None, 0.1, 1e-3, "silu")
    torch.testing.assert_close(got, want)
    g1, = torch.autograd.grad(got.sum(), x)
    g2, = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(g1, g2)


# ---- ops: opcheck, the CUDA kernels' thread bodies, bad input --------------------------------------------------------

def _op_samples(device):
    shape = (2, 5, 3, 4, 3)
    x = make(shape, torch.float32, device, layout="channels_last_3d")
    grad = make(shape, torch.float32, device, seed=2)
    scale, shift = coefficients(shape, torch.float32, device)
    cx, c1 = coefficients(shape, torch.float32, device, seed=4)
    return [
        (torch.ops.epamx._channel_moments.default, (x,)),
        (torch.ops.epamx.affine_act.default, (x, scale, shift, 2)),
        (torch.ops.epamx._affine_act_backward_reduce.default, (grad, x, scale, shift, 1)),
        (torch.ops.epamx._affine_act_backward.default, (grad, x, scale, shift, scale, cx, c1, 2)),
    ]


def test_opcheck(device):
    for op, args in _op_samples(device):
        torch.library.opcheck(op, args)
    shape = (2, 3, 2, 3, 2)
    x = make(shape, device=device).requires_grad_()
    scale, shift = (t.requires_grad_() for t in coefficients(shape, torch.float64, device))
    torch.library.opcheck(torch.ops.epamx.affine_act.default, (x, scale, shift, 2))


def test_compile_fullgraph(device):
    shape = (2, 5, 3, 4, 3)
    x = make(shape, torch.float32, device, layout="channels_last_3d")
    scale, shift = coefficients(shape, torch.float32, device)
    compiled = torch.compile(lambda x, s, t: affine_act(x, s, t, "silu") * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, scale, shift), affine_act(x, scale, shift, "silu") * 2)


# Shapes for the CUDA kernels' bodies: rows shorter than a block (several per block in (N, C, S) memory), rows cut
# into slices whose partial sums a second pass adds, C > 256 (two channel tiles of 150 per sample in (N, S, C)
# memory, the last row tile partial), two elements per row.
THREAD_BODY_SHAPES = [(2, 5, 3, 4, 3), (2, 3, 8, 32, 32), (1, 300, 2, 3, 5), (3, 17, 2, 1, 1)]


@pytest.mark.parametrize("shape", THREAD_BODY_SHAPES, ids=_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("act", ACTS)
def test_cuda_thread_bodies_in_any_order_match_the_cpu_kernels(act, layout, shape):
    x = make(shape, torch.float32, layout=layout)
    grad = make(shape, torch.float32, seed=2, layout=layout)
    scale, shift = coefficients(shape, torch.float32, "cpu")
    cx, c1 = coefficients(shape, torch.float32, "cpu", seed=4)
    code = ACTIVATIONS[act]
    g = torch.Generator().manual_seed(0)
    *_, tiles, _, splits = _C._testing.batch_norm_act_reduce_plan(x)
    blocks, elements = tiles * splits, x.numel()  # the reductions' first pass runs blocks, the rest elements
    cases = [
        (0, blocks, None, torch.ops.epamx._channel_moments(x)),
        (1, elements, None, (torch.ops.epamx.affine_act(x, scale, shift, code),)),
        (2, blocks, grad, torch.ops.epamx._affine_act_backward_reduce(grad, x, scale, shift, code)),
        (3, elements, grad, (torch.ops.epamx._affine_act_backward(grad, x, scale, shift, scale, cx, c1, code),)),
    ]
    for kind, threads, gr, expected in cases:
        for order in [torch.randperm(threads, generator=g), torch.arange(threads).flip(0)]:
            got = _C._testing.batch_norm_act_run_thread_bodies(kind, x, gr, scale, shift, scale, cx, c1, code, order)
            for a, b in zip(got, expected):
                # the CPU kernels sum a row in blocks, the thread bodies in slices and lane trees: float64 sums agree
                # to rounding; the vectorised kernels may fuse multiply-adds (as nvcc does), so what they compute in
                # float32 (the outputs, and the u the backward reduction sums) agrees to a few ulp
                tol = 1e-12 if kind == 0 else 1e-6
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
                assert a.stride() == b.stride()
        if kind in (0, 2):  # the same blocks in another order: the same sums, bit for bit
            again = _C._testing.batch_norm_act_run_thread_bodies(kind, x, gr, scale, shift, scale, cx, c1, code,
                                                                  torch.arange(threads))
            for a, b in zip(again, got):
                assert torch.equal(a, b)


def test_thread_body_hook_checks_its_order():
    x = make((2, 5, 3, 4, 3), torch.float32)
    scale, shift = coefficients(x.shape, torch.float32, "cpu")
    hook = _C._testing.batch_norm_act_run_thread_bodies
    with pytest.raises(ValueError, match="order must list all 2 blocks"):
        hook(0, x, None, None, None, None, None, None, 0, torch.arange(10))
    with pytest.raises(ValueError, match="block index 2 out of range"):
        hook(0, x, None, None, None, None, None, None, 0, torch.arange(2) + 1)
    with pytest.raises(ValueError, match="order must list all 360 thread indices"):
        hook(1, x, None, scale, shift, None, None, None, 0, torch.arange(10))


def _meta(shape, layout):
    x = torch.empty(shape, device="meta")
    return x.contiguous(memory_format=torch.channels_last_3d) if layout == "channels_last_3d" else x


def _plan(shape, layout):
    return dict(zip(["items", "lanes", "channel_tiles", "tiles", "steps", "splits"],
                    _C._testing.batch_norm_act_reduce_plan(_meta(shape, layout))))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("shape", [(4, 54, 16, 56, 56), (4, 108, 48, 14, 14), (4, 432, 16, 7, 7), (16, 432, 4, 2, 2),
                                   (2, 5, 3, 4, 3), (1, 300, 2, 3, 5), (3, 1, 1, 1, 1), (1, 1, 1, 1, 100003),
                                   (5, 257, 1, 1, 1)], ids=_id)
def test_reduce_plan_covers_every_row_once(shape, layout):
    # The CUDA reductions' work split: whole blocks' worth of threads, every element of every row in exactly one
    # slice, and the blocks of one pass bounded (the grid-stride loop takes any remainder).
    n, c = shape[:2]
    s = torch.Size(shape[2:]).numel()
    p = _plan(shape, layout)
    assert p["items"] * p["lanes"] <= 256 and p["items"] >= 1 and p["lanes"] >= 1
    assert (p["splits"] - 1) * p["steps"] * p["lanes"] < s <= p["splits"] * p["steps"] * p["lanes"]
    if not _meta(shape, layout).is_contiguous():  # read as (N, S, C); a tensor both ways counts as contiguous
        assert p["channel_tiles"] * p["items"] >= c > (p["channel_tiles"] - 1) * p["items"]
        assert p["tiles"] == n * p["channel_tiles"]
    else:
        assert p["tiles"] * p["items"] >= n * c > (p["tiles"] - 1) * p["items"]
        assert p["lanes"] == min(s, 256)
    assert p["splits"] == 1 or p["steps"] >= 16
    assert p["tiles"] * p["splits"] <= max(p["tiles"], 2048 + p["tiles"])


def test_reduce_plan_at_epamnet_shapes():
    # The launch configurations batch_norm_act_cuda.cu's comment describes: EPAM-Net's first RGB stage, 216 rows of
    # 50176 elements, split over 2160 (contiguous) and 2008 (channels_last_3d) blocks instead of 216 threads.
    assert _plan((4, 54, 16, 56, 56), "contiguous") == dict(items=1, lanes=256, channel_tiles=1, tiles=216, steps=20,
                                                            splits=10)
    assert _plan((4, 54, 16, 56, 56), "channels_last_3d") == dict(items=54, lanes=4, channel_tiles=1, tiles=4,
                                                                  steps=25, splits=502)
    assert _plan((4, 432, 16, 7, 7), "channels_last_3d") == dict(items=216, lanes=1, channel_tiles=2, tiles=8,
                                                                 steps=16, splits=49)
    # Short rows share a block: 49 lanes each, 5 rows a block.
    assert _plan((4, 432, 1, 7, 7), "contiguous")["items"] == 5


def test_empty_inputs(device):
    x = torch.empty(0, 4, 3, 3, 3, device=device)
    scale, shift = torch.empty(0, 4, device=device), torch.empty(0, 4, device=device)
    assert affine_act(x, scale, shift, "relu").shape == x.shape
    s1, s2 = torch.ops.epamx._channel_moments(x)
    assert s1.shape == (0, 4) and s2.shape == (0, 4)


def test_bad_input_is_explained(device):
    x = make((2, 3, 2, 2, 2), torch.float32, device)
    scale, shift = coefficients(x.shape, torch.float32, device)
    with pytest.raises(ValueError, match="activation must be one of"):
        affine_act(x, scale, shift, "gelu")
    with pytest.raises(TypeError, match="scale must be Double for a Double x, got Float"):
        affine_act(x.double(), scale, shift, "relu")
    with pytest.raises(ValueError, match=r"shift must have shape \(N, C\)"):
        affine_act(x, scale, shift[:1], "relu")
    with pytest.raises(ValueError, match="activation must be 0"):
        torch.ops.epamx.affine_act(x, scale, shift, 3)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        torch.ops.epamx._channel_moments(x.int())
    with pytest.raises(ValueError, match="grad must have x's shape"):
        torch.ops.epamx._affine_act_backward_reduce(x[:1], x, scale, shift, 1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_act(torch.randn(1, 3, 1, 1, 1, device=device), None, None, None, None)
