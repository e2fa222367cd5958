"""channel_pool against the eager composition (strided frame selection, torch.max, torch.mean)."""
import pytest
import torch
from torch._prims_common import suggest_memory_format

from epamx import _C
from epamx.ops import channel_pool, channel_pool_reference
from testkit import TOLERANCES, poisoned_allocations

# ((N, C, T, H, W), t_stride): EPAM-Net's pose features, T not a multiple of t_stride, odd C, H != W; C and H*W
# that leave the CPU kernels' vectors (8 to 16 lanes) a partial last one, in either memory format; t_stride 1
# (whole frames are one run); frames of more than 1024 positions (the NCTHW kernels' block, split in pieces).
CASES = [((2, 216, 48, 7, 7), 3), ((1, 17, 7, 5, 3), 3), ((2, 9, 5, 2, 4), 2), ((3, 1, 4, 3, 3), 1),
         ((1, 5, 3, 1, 1), 4), ((2, 33, 16, 14, 14), 5), ((2, 37, 6, 5, 7), 2), ((1, 70, 9, 9, 13), 1),
         ((1, 3, 5, 33, 35), 2)]
# Memory formats of x (and of the incoming gradient): the kernels read both natively, and their results follow x.
LAYOUTS = ["contiguous", "channels_last"]


def _id(case):
    return "x".join(map(str, case[0])) + f"-s{case[1]}"


def make_input(shape, dtype=torch.float32, device="cpu", seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def lay_out(t, layout):
    return t.contiguous(memory_format=torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format)


def assert_format_of(result, x):
    """result has x's memory format, with the strides the fake kernel gives it."""
    expected = torch.empty(result.shape, memory_format=suggest_memory_format(x))
    assert result.stride() == expected.stride(), (result.stride(), expected.stride())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_matches_reference(case, layout, dtype, device):
    shape, t_stride = case
    x = lay_out(make_input(shape, dtype, device), layout)
    with poisoned_allocations():
        out = channel_pool(x, t_stride)
    expected = channel_pool_reference(x.double(), t_stride)
    assert out.shape == expected.shape and out.dtype == dtype
    assert_format_of(out, x)
    torch.testing.assert_close(out[:, 0].double(), expected[:, 0], rtol=0, atol=0)  # the max is exact
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out[:, 1].double(), expected[:, 1], rtol=rtol, atol=atol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_backward_matches_reference(case, layout, dtype, device):
    shape, t_stride = case
    x = lay_out(make_input(shape, dtype, device), layout)
    out_shape = channel_pool_reference(x, t_stride).shape
    grad = lay_out(make_input(out_shape, dtype, device, seed=4), layout)
    leaf = x.double().requires_grad_(True)
    (expected,) = torch.autograd.grad(channel_pool_reference(leaf, t_stride), leaf, grad.double())
    with poisoned_allocations():
        actual = torch.ops.epamx._channel_pool_backward(grad, x, t_stride)
    assert_format_of(actual, x)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


def test_gradient_in_another_memory_format_than_x(device):
    x = make_input((2, 20, 6, 3, 5), device=device)
    grad = make_input((2, 2, 3, 3, 5), device=device, seed=1)
    expected = torch.ops.epamx._channel_pool_backward(grad, x, 2)
    for x_layout, grad_layout in [("contiguous", "channels_last"), ("channels_last", "contiguous")]:
        actual = torch.ops.epamx._channel_pool_backward(lay_out(grad, grad_layout), lay_out(x, x_layout), 2)
        assert_format_of(actual, lay_out(x, x_layout))
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_ties_go_to_the_first_channel_like_torch_max(device):
    # Small integers: most positions have several channels sharing the maximum.
    x = torch.randint(0, 3, (2, 6, 4, 3, 3), generator=torch.Generator().manual_seed(1)).float().to(device)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    grad = torch.randn(2, 2, 2, 3, 3, generator=torch.Generator().manual_seed(2)).to(device)
    (channel_pool(a, 2) * grad).sum().backward()
    (channel_pool_reference(b, 2) * grad).sum().backward()
    # max + mean / C rounds differently from the reference's sum of its two gradients: an ulp at most, where
    # a gradient routed to the wrong channel would be off by a whole gradient value.
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=5e-7)
    first = (x[:, :, ::2] == x[:, :, ::2].max(dim=1, keepdim=True)[0]).float().argmax(dim=1)
    routed = (a.grad[:, :, ::2] - grad[:, 1:2] / 6).abs().argmax(dim=1)
    assert torch.equal(routed, first)


def test_nan_propagates_like_torch_max(device):
    x = make_input((1, 5, 3, 2, 2), torch.float32, device)
    x[0, 2, 0, 1, 1] = float("nan")
    x[0, 4, 2, 0, 0] = float("nan")
    torch.testing.assert_close(channel_pool(x, 1), channel_pool_reference(x, 1), equal_nan=True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("channels", [6, 37])
def test_ties_nan_and_infinities_in_every_lane(channels, dtype, layout, device):
    # Small integers make most maxima ties; NaN (one or several per position), +-inf and all--inf positions are
    # scattered over channels, and C = 37 spreads the channels over the lanes of several vectors and a partial one.
    # Forward and gradient must follow torch.max: NaN wins, and the first of equal maxima (or NaNs) takes the
    # max gradient.
    g = torch.Generator().manual_seed(channels)
    x = torch.randint(-2, 3, (2, channels, 5, 3, 7), generator=g).double()
    special = torch.rand(x.shape, generator=g)
    x[special < 0.04] = float("nan")
    x[(special > 0.04) & (special < 0.07)] = float("inf")
    x[(special > 0.07) & (special < 0.10)] = -float("inf")
    x[0, :, :, 0, 0] = -float("inf")
    x[1, :, :, 2, 6] = float("nan")
    x = lay_out(x.to(device=device, dtype=dtype), layout)
    out = channel_pool(x, 2)
    expected = channel_pool_reference(x.double(), 2)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out[:, 0].double(), expected[:, 0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out[:, 1].double(), expected[:, 1], rtol=rtol, atol=atol, equal_nan=True)
    grad = lay_out(make_input(expected.shape, dtype, device, seed=2), layout)
    leaf = x.detach().double().requires_grad_(True)
    (expected_dx,) = torch.autograd.grad(channel_pool_reference(leaf, 2), leaf, grad.double())
    actual_dx = torch.ops.epamx._channel_pool_backward(grad, x, 2)
    # Routed to the wrong channel, a max gradient would be off by a whole gradient value.
    torch.testing.assert_close(actual_dx.double(), expected_dx, rtol=rtol, atol=atol)


@pytest.mark.parametrize("view", ["channel_slice", "transposed", "channels_last_slice", "channels_last_crop"])
def test_non_contiguous_input(view, device):
    base = make_input((2, 12, 9, 5, 4), torch.float32, device)
    cl = base.contiguous(memory_format=torch.channels_last_3d)
    x = {"channel_slice": base[:, ::2], "transposed": base[:, ::2].transpose(3, 4),
         "channels_last_slice": cl[:, :, ::2], "channels_last_crop": cl[:, 1:10, :, 1:]}[view]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last_3d)
    out = channel_pool(x, 2)
    torch.testing.assert_close(out, channel_pool_reference(x, 2))
    assert_format_of(out, x)
    grad = make_input(out.shape, device=device, seed=1)
    leaf = x.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(channel_pool_reference(leaf, 2), leaf, grad)
    actual = torch.ops.epamx._channel_pool_backward(grad, x, 2)
    assert_format_of(actual, x)
    torch.testing.assert_close(actual, expected)


def test_gradcheck_fp64(device):
    x = make_input((2, 5, 7, 3, 4), torch.float64, device).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: channel_pool(v, 3), (x,))


def test_gradgradcheck_fp64(device):
    x = make_input((2, 5, 7, 3, 4), torch.float64, device).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda v: channel_pool(v, 3), (x,))
    # The backward op on its own: linear in its gradient, locally constant in x (away from ties).
    grad = make_input((2, 2, 3, 3, 4), torch.float64, device, seed=3).requires_grad_(True)
    backward = torch.ops.epamx._channel_pool_backward
    assert torch.autograd.gradcheck(lambda g, v: backward(g, v, 3), (grad, x))
    assert torch.autograd.gradgradcheck(lambda g, v: backward(g, v, 3), (grad, x))


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_second_derivatives_match_the_reference(ties, device):
    # Hessian-vector products of a loss through the pooling, against torch.max and torch.mean's own; with ties
    # the max gradient of both must stay with the first channel.
    def hvp(fn, x, vector):
        x = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((fn(x, 3).sin() * 3).sum(), x, create_graph=True)
        return torch.autograd.grad((grad * vector).sum(), x)[0]

    x = make_input((2, 6, 8, 3, 4), torch.float64, device)
    if ties:
        x = x.round().clamp(-1, 1)
    vector = torch.randn_like(x)
    torch.testing.assert_close(hvp(channel_pool, x, vector), hvp(channel_pool_reference, x, vector))


@pytest.mark.parametrize("channels", [7, 40, 1], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("t_stride", [1, 3])
def test_gpu_thread_bodies_are_order_independent(backward, t_stride, layout, channels):
    # channels_last_3d: the NTHWC bodies, a team of lanes per position (C = 7: 8 lanes, one idle; C = 40: 32 lanes,
    # 8 of them with two channels; C = 1: one lane), combined by the GPU's butterfly.
    x = lay_out(make_input((2, channels, 5, 3, 2)), layout)
    x[0, -1, 0, 1, 1] = x[0, 0, 0, 1, 1]  # a tie: the first channel keeps the max gradient
    x[1, channels // 2, 3, 0, 0] = float("nan")  # NaN wins
    out_shape = channel_pool_reference(x, t_stride).shape
    grad = lay_out(make_input(out_shape, seed=2), layout) if backward else None
    expected = torch.ops.epamx._channel_pool_backward(grad, x, t_stride) if backward else channel_pool(x, t_stride)
    threads = 2 * (5 if backward else out_shape[2]) * 6
    g = torch.Generator().manual_seed(t_stride)
    for order in [torch.arange(threads), torch.arange(threads).flip(0), torch.randperm(threads, generator=g)]:
        with poisoned_allocations():
            actual = _C._testing.channel_pool_run_thread_bodies(x, t_stride, grad, order)
        assert_format_of(actual, x)
        # the maximum and the gradients are exact; the mean sums the channels in another order (a lane tree)
        torch.testing.assert_close(actual, expected, rtol=0 if backward else 1e-6, atol=0 if backward else 1e-6,
                                   equal_nan=True)
        if not backward:
            torch.testing.assert_close(actual[:, 0], expected[:, 0], rtol=0, atol=0, equal_nan=True)


def test_thread_body_hook_checks_its_order():
    x = make_input((1, 3, 4, 2, 2))
    with pytest.raises(ValueError, match="order must list all 16 thread indices"):
        _C._testing.channel_pool_run_thread_bodies(x, 1, None, torch.arange(5))
    with pytest.raises(ValueError, match="out of range"):
        _C._testing.channel_pool_run_thread_bodies(x, 1, None, torch.arange(16) + 1)
    with pytest.raises(RuntimeError, match="order must be a cpu tensor"):
        _C._testing.channel_pool_run_thread_bodies(x, 1, None, torch.arange(16, device="meta"))


@pytest.mark.parametrize("t_stride", [2**31, 2**32, 2**32 + 1, 2**63 - 1])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_a_t_stride_beyond_the_frames_reads_frame_zero(t_stride, backward, device):
    # Any t_stride >= T pools frame 0 alone, as t_stride = T does; the kernels' index types need not hold it
    # (2^32 narrowed to int32 is 0, 2^32 + 1 is 1) and T + t_stride - 1 must not overflow.
    x = make_input((2, 5, 7, 3, 2), device=device)
    if backward:
        grad = make_input((2, 2, 1, 3, 2), device=device, seed=3)
        actual = torch.ops.epamx._channel_pool_backward(grad, x, t_stride)
        expected = torch.ops.epamx._channel_pool_backward(grad, x, 7)
    else:
        actual = channel_pool(x, t_stride)
        expected = channel_pool(x, 7)
        torch.testing.assert_close(actual, channel_pool_reference(x, 7))
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("t_stride", [2**32, 2**63 - 1])
def test_gpu_thread_bodies_with_a_t_stride_beyond_the_frames(t_stride):
    x = make_input((2, 3, 4, 2, 3))
    for grad in [None, make_input((2, 2, 1, 2, 3), seed=5)]:
        threads = 2 * (4 if grad is not None else 1) * 6
        actual = _C._testing.channel_pool_run_thread_bodies(x, t_stride, grad, torch.randperm(threads))
        expected = channel_pool(x, 4) if grad is None else torch.ops.epamx._channel_pool_backward(grad, x, 4)
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout, device):
    # The fake kernels must give the results the strides the kernels do, in either memory format.
    x = lay_out(make_input((2, 6, 7, 4, 5), torch.float32, device), layout)
    grad = lay_out(make_input((2, 2, 3, 4, 5), torch.float32, device), layout)
    torch.library.opcheck(torch.ops.epamx.channel_pool.default, (x, 3))
    torch.library.opcheck(torch.ops.epamx.channel_pool.default, (x.clone().requires_grad_(True), 3))
    torch.library.opcheck(torch.ops.epamx._channel_pool_backward.default, (grad, x, 3))
    torch.library.opcheck(torch.ops.epamx._channel_pool_backward.default, (grad.clone().requires_grad_(True), x, 3))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend, device):
    def f(v):
        return (channel_pool(v * 2, 3).sigmoid() ** 2).sum()

    x = make_input((2, 6, 7, 4, 5), torch.float32, device)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    f(a).backward()
    torch.compile(f, fullgraph=True, backend=backend, dynamic=backend == "aot_eager")(b).backward()
    torch.testing.assert_close(b.grad, a.grad)


@pytest.mark.parametrize("shape", [(0, 4, 6, 2, 2), (2, 4, 0, 2, 2), (2, 4, 6, 0, 2)])
def test_empty_tensors(shape, device):
    x = make_input(shape, torch.float32, device).requires_grad_(True)
    out = channel_pool(x, 3)
    assert out.shape == channel_pool_reference(x, 3).shape
    out.sum().backward()
    assert x.grad.shape == x.shape


BAD_INPUTS = [
    ("4-D", lambda d: channel_pool(torch.randn(2, 4, 3, 3, device=d)), ValueError, r"x must be 5-D \(N, C, T, H, W\)"),
    ("no channels", lambda d: channel_pool(torch.randn(2, 0, 3, 3, 3, device=d)), ValueError,
     "at least one channel"),
    ("t_stride 0", lambda d: channel_pool(torch.randn(2, 4, 3, 3, 3, device=d), 0), ValueError,
     "t_stride must be >= 1, got 0"),
    ("integer x", lambda d: channel_pool(torch.ones(2, 4, 3, 3, 3, dtype=torch.int64, device=d)), TypeError,
     "x must be a floating tensor"),
    ("grad shape", lambda d: torch.ops.epamx._channel_pool_backward(torch.randn(2, 2, 2, 3, 3, device=d),
                                                                    torch.randn(2, 4, 5, 3, 3, device=d), 2),
     ValueError, r"grad must have shape \[2, 2, 3, 3, 3\] \(N, 2, T', H, W\), got \[2, 2, 2, 3, 3\]"),
]


@pytest.mark.parametrize("call,error,message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_explained(call, error, message, device):
    with pytest.raises(error, match=message):
        call(device)
