"""temporal_shift / temporal_shift_ against the plain-PyTorch reference (zeros_like + slicing, written from the
definition in epamx.ops.temporal_shift), on every device present, every float dtype, both layouts."""
import pytest
import torch

from epamx import _C
from epamx.nn import TemporalShift
from epamx.ops import temporal_shift, temporal_shift_, temporal_shift_reference, temporal_unshift_
from testkit import DEVICES, on_busy_side_stream, poisoned_allocations

LAYOUTS = ["NCTHW", "(NT)CHW"]

# (N, C, T, H, W, fold_div): EPAM-Net-like, odd C and T in {1, 2, 3, 16, 48}, C = fold_div and
# fold_div <= C < 2 * fold_div (fold 1), H != W.
SHAPES = [
    (2, 16, 16, 7, 7, 8),
    (1, 17, 3, 5, 3, 4),
    (3, 9, 1, 2, 5, 2),
    (1, 24, 48, 4, 4, 4),
    (2, 7, 2, 3, 1, 3),
    (2, 5, 3, 2, 2, 5),
    (1, 3, 5, 2, 3, 2),
    (2, 24, 3, 17, 19, 8),  # frames of 323 pixels: the channels-last kernel's blocks of 256 pixels and a partial one
    (1, 100, 4, 5, 7, 8),  # rows of 200 / 400 bytes (2- / 4-byte dtypes): the vector and the block assembly
    (2, 72, 3, 3, 5, 2),  # fold = C / 2: no unshifted channels
]


def _random_shapes(count, seed=1234):
    g = torch.Generator().manual_seed(seed)
    shapes = []
    for _ in range(count):
        def r(lo, hi):
            return int(torch.randint(lo, hi + 1, (1,), generator=g))
        t = [1, 2, 3, 16, 48][r(0, 4)]
        n, c, h, w, fold_div = r(1, 3), r(2, 41), r(1, 9), r(1, 9), r(2, 8)
        shapes.append((n, max(c, fold_div), t, h, w, fold_div))  # a fold of at least 1
    return shapes


ALL_SHAPES = SHAPES + _random_shapes(5)


def _shape_id(s):
    return "x".join(map(str, s[:5])) + f"-fd{s[5]}"


def make_input(shape, layout, dtype=torch.float32, device="cpu", seed=0):
    n, c, t, h, w, fold_div = shape
    g = torch.Generator().manual_seed(seed)
    if layout == "NCTHW":
        x, num_segments = torch.randn(n, c, t, h, w, generator=g), None
    else:
        x, num_segments = torch.randn(n * t, c, h, w, generator=g), t
    return x.to(device=device, dtype=dtype), fold_div, num_segments


def assert_bitwise_equal(actual, expected):
    # The shift only moves data: results must match exactly, whatever the dtype.
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# ---- values --------------------------------------------------------------------------------------------------

def test_poisoning_is_active():
    with poisoned_allocations():
        assert torch.empty(64).isnan().all(), "the NaN poisoning the tests rely on is not in effect"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=_shape_id)
def test_forward_matches_reference(shape, layout, dtype, device):
    x, fold_div, num_segments = make_input(shape, layout, dtype, device)
    with poisoned_allocations():
        out = temporal_shift(x, fold_div, num_segments)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device and out.is_contiguous()
    assert_bitwise_equal(out, temporal_shift_reference(x, fold_div, num_segments))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=_shape_id)
def test_backward_op_is_the_adjoint(shape, layout, dtype, device):
    x, fold_div, num_segments = make_input(shape, layout, dtype, device)
    grad, _, _ = make_input(shape, layout, dtype, device, seed=1)
    x.requires_grad_(True)
    (expected,) = torch.autograd.grad(temporal_shift_reference(x, fold_div, num_segments), x, grad)
    with poisoned_allocations():
        out = torch.ops.epamx._temporal_shift_backward(grad, fold_div, num_segments)
    assert_bitwise_equal(out, expected)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=_shape_id)
def test_channels_last_forward_and_adjoint(shape, layout, dtype, device):
    """Channels-last inputs (the models' CPU format) give channels-last results, every element written."""
    x, fold_div, num_segments = make_input(shape, layout, dtype, device)
    memory_format = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    x = x.contiguous(memory_format=memory_format).requires_grad_(True)
    grad = make_input(shape, layout, dtype, device, seed=1)[0].contiguous(memory_format=memory_format)
    want = temporal_shift_reference(x, fold_div, num_segments)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    with poisoned_allocations():
        out = temporal_shift(x.detach(), fold_div, num_segments)
        back = torch.ops.epamx._temporal_shift_backward(grad, fold_div, num_segments)
    assert out.is_contiguous(memory_format=memory_format) and back.is_contiguous(memory_format=memory_format)
    assert_bitwise_equal(out, want.detach())
    assert_bitwise_equal(back, want_grad)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=_shape_id)
def test_inplace_matches_out_of_place(shape, layout, dtype, device):
    x, fold_div, num_segments = make_input(shape, layout, dtype, device)
    y = x.clone()
    assert temporal_shift_(y, fold_div, num_segments) is y
    assert_bitwise_equal(y, temporal_shift(x, fold_div, num_segments))
    z = x.clone()
    assert torch.ops.epamx.temporal_shift_(z, fold_div, num_segments) is None
    assert_bitwise_equal(z, y)


# ---- strides ---------------------------------------------------------------------------------------------------

# name -> (base shape builder, view of the base). Views keep the base's other elements, which must survive.
NON_CONTIGUOUS_5D = {
    "channel_slice": (lambda n, c, t, h, w: (n, c + 3, t, h, w), lambda b: b[:, 1:-2]),
    "time_stride": (lambda n, c, t, h, w: (n, c, 2 * t, h, w), lambda b: b[:, :, ::2]),
    "batch_offset": (lambda n, c, t, h, w: (n + 1, c, t, h, w), lambda b: b[1:]),
    "batch_stride": (lambda n, c, t, h, w: (2 * n, c, t, h, w), lambda b: b[::2]),
    "from_NTCHW": (lambda n, c, t, h, w: (n, t, c, h, w), lambda b: b.permute(0, 2, 1, 3, 4)),
    "spatial_stride": (lambda n, c, t, h, w: (n, c, t, h, 2 * w), lambda b: b[..., ::2]),
    "transposed_hw": (lambda n, c, t, h, w: (n, c, t, w, h), lambda b: b.transpose(3, 4)),
    "channels_last_3d": (lambda n, c, t, h, w: (n, c, t, h, w),
                         lambda b: b.contiguous(memory_format=torch.channels_last_3d)),
}
NON_CONTIGUOUS_4D = {  # (N*T, C, H, W) with T = t
    "clip_offset": (lambda n, c, t, h, w: ((n + 1) * t, c, h, w), lambda b, t: b[t:]),
    "frame_stride": (lambda n, c, t, h, w: (2 * n * t, c, h, w), lambda b, t: b[::2]),
    "channel_slice": (lambda n, c, t, h, w: (n * t, c + 2, h, w), lambda b, t: b[:, 2:]),
    "spatial_stride": (lambda n, c, t, h, w: (n * t, c, 2 * h, w), lambda b, t: b[:, :, ::2]),
    "channels_last": (lambda n, c, t, h, w: (n * t, c, h, w), lambda b, t: b.contiguous(memory_format=torch.channels_last)),
}
STRIDE_CASES = [("NCTHW", k) for k in NON_CONTIGUOUS_5D] + [("(NT)CHW", k) for k in NON_CONTIGUOUS_4D]


def _strided_case(layout, name, dtype, device, shape=(2, 11, 5, 3, 4, 4)):
    n, c, t, h, w, fold_div = shape
    g = torch.Generator().manual_seed(7)
    if layout == "NCTHW":
        base_shape, view = NON_CONTIGUOUS_5D[name]
        view_of = view
        num_segments = None
    else:
        base_shape, view = NON_CONTIGUOUS_4D[name]
        view_of = lambda b: view(b, t)  # noqa: E731
        num_segments = t
    base = torch.randn(base_shape(n, c, t, h, w), generator=g).to(device=device, dtype=dtype)
    return base, view_of, fold_div, num_segments


@pytest.mark.parametrize("layout,name", STRIDE_CASES)
def test_non_contiguous_out_of_place(layout, name, dtype, device):
    base, view_of, fold_div, num_segments = _strided_case(layout, name, dtype, device)
    x = view_of(base)
    assert not x.is_contiguous() or x.storage_offset() > 0
    before = base.clone()
    out = temporal_shift(x, fold_div, num_segments)
    channels_last = {5: torch.channels_last_3d, 4: torch.channels_last}[x.dim()]
    assert out.is_contiguous(memory_format=channels_last if name.startswith("channels_last") else torch.contiguous_format)
    assert_bitwise_equal(out, temporal_shift_reference(x, fold_div, num_segments))
    assert_bitwise_equal(base, before)
    torch.library.opcheck(torch.ops.epamx.temporal_shift.default, (x, fold_div, num_segments))


@pytest.mark.parametrize("layout,name", STRIDE_CASES)
def test_non_contiguous_in_place(layout, name, dtype, device):
    base, view_of, fold_div, num_segments = _strided_case(layout, name, dtype, device)
    x = view_of(base)
    before = base.clone()
    expected = temporal_shift_reference(x.clone(), fold_div, num_segments)
    temporal_shift_(x, fold_div, num_segments)
    assert_bitwise_equal(x, expected)
    outside = torch.ones(base.shape, dtype=torch.bool, device=device)
    view_of(outside).fill_(False)
    assert_bitwise_equal(base[outside], before[outside])


def test_inplace_rejects_overlapping_memory(device):
    x = torch.randn(1, 8, 4, 1, 3, device=device).expand(2, 8, 4, 3, 3)
    with pytest.raises(ValueError, match="overlapping memory"):
        temporal_shift_(x, 4)
    # Views torch's own overlap check calls "too hard": every stride 1, or a channel stride inside a frame.
    base = torch.randn(200, device=device)
    for size, stride in [((1, 8, 3, 2, 2), (1, 1, 1, 1, 1)), ((2, 8, 3, 2, 2), (96, 3, 24, 2, 1))]:
        view = base.as_strided(size, stride)
        before = base.clone()
        for op in (temporal_shift_, temporal_unshift_):
            with pytest.raises(ValueError, match="overlapping memory"):
                op(view, 4)
        assert_bitwise_equal(base, before)


def test_inplace_accepts_strided_views_that_do_not_overlap(device):
    # Gaps between elements, dims in any stride order: no element shares an address, so these are shifted.
    base = torch.randn(600, device=device)
    for size, stride in [((2, 8, 3, 2, 2), (200, 20, 6, 3, 1)), ((2, 8, 3, 2, 2), (3, 6, 48, 144, 289))]:
        view = base.clone().as_strided(size, stride)
        expected = temporal_shift_reference(view, 4)
        temporal_shift_(view, 4)
        assert_bitwise_equal(view, expected)


# ---- the CUDA kernels' thread bodies, run on the CPU in any order ----------------------------------------------

# The kernels copy in units of up to 16 bytes where the frame plane allows: these cases reach each unit width.
THREAD_BODY_CASES = [
    ((2, 17, 6, 3, 5, 4), torch.float32),   # 60-byte planes: 4-byte units
    ((2, 17, 6, 3, 5, 4), torch.float16),   # 30-byte planes: 2-byte units
    ((2, 12, 5, 2, 3, 4), torch.bfloat16),  # 12-byte planes: 4-byte units of two pixels
    ((2, 9, 4, 2, 1, 2), torch.float64),    # 16-byte planes: 16-byte units
    ((2, 16, 5, 4, 4, 4), torch.float32),   # 64-byte planes: 16-byte units
    ((1, 10, 3, 2, 2, 3), torch.float16),   # 8-byte planes: 8-byte units
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("shape,dtype", THREAD_BODY_CASES, ids=lambda v: _shape_id(v) if isinstance(v, tuple) else str(v))
def test_gpu_thread_bodies_are_order_independent(layout, inplace, backward, shape, dtype):
    x, fold_div, num_segments = make_input(shape, layout, dtype)
    if backward:
        leaf = x.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(temporal_shift_reference(leaf, fold_div, num_segments), leaf, x)
    else:
        expected = temporal_shift_reference(x, fold_div, num_segments)
    g = torch.Generator().manual_seed(3)
    threads = _count_threads(x, fold_div, num_segments, inplace, backward)
    orders = [torch.arange(threads), torch.arange(threads).flip(0)]
    orders += [torch.randperm(threads, generator=g) for _ in range(3)]
    for order in orders:
        with poisoned_allocations():
            out = _C._testing.temporal_shift_run_thread_bodies(x.clone(), fold_div, num_segments, inplace, backward,
                                                               order)
        assert_bitwise_equal(out, expected)


def _count_threads(x, fold_div, num_segments, inplace, backward):
    """Threads the CUDA kernel launches for a contiguous input: one per copy unit (out of place) or per column of
    units in a shifted channel (in place); the unit is the widest of 2/4/8/16 bytes dividing a frame plane."""
    n, c, t = (x.shape[0] // num_segments, x.shape[1], num_segments) if num_segments else x.shape[:3]
    plane_bytes = x.shape[-1] * x.shape[-2] * x.element_size()
    unit = max(x.element_size(), min(16, plane_bytes & -plane_bytes))
    if inplace:
        return n * 2 * (c // fold_div) * plane_bytes // unit
    return x.numel() * x.element_size() // unit


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_gpu_inplace_thread_bodies_on_channels_last(backward):
    x, fold_div, _ = make_input((2, 17, 6, 3, 5, 4), "NCTHW")
    x = x.contiguous(memory_format=torch.channels_last_3d)
    leaf = x.clone().requires_grad_(True)
    shifted = temporal_shift_reference(leaf, fold_div)
    expected = torch.autograd.grad(shifted, leaf, x)[0] if backward else shifted.detach()
    threads = 2 * 2 * (17 // fold_div) * 15  # one per column of a shifted channel, element by element
    g = torch.Generator().manual_seed(5)
    for order in [torch.arange(threads), torch.arange(threads).flip(0), torch.randperm(threads, generator=g)]:
        y = x.clone()
        out = _C._testing.temporal_shift_run_thread_bodies(y, fold_div, None, True, backward, order)
        assert out.data_ptr() == y.data_ptr(), "channels-last memory is shifted where it is"
        assert_bitwise_equal(out, expected)


def test_thread_body_hook_checks_its_order():
    x, fold_div, num_segments = make_input((1, 8, 3, 2, 2, 4), "NCTHW")
    with pytest.raises(ValueError, match="thread_order must list all"):
        _C._testing.temporal_shift_run_thread_bodies(x, fold_div, None, False, False, torch.arange(5))
    with pytest.raises(RuntimeError, match="same device"):
        _C._testing.temporal_shift_run_thread_bodies(x, fold_div, None, False, False,
                                                     torch.arange(x.numel(), device="meta"))


# ---- gradients -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_fp64(layout, device):
    x, fold_div, num_segments = make_input((2, 9, 4, 3, 2, 4), layout, torch.float64, device)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: temporal_shift(v, fold_div, num_segments), (x,))
    assert torch.autograd.gradgradcheck(lambda v: temporal_shift(v, fold_div, num_segments), (x,))
    assert torch.autograd.gradcheck(lambda v: temporal_shift_(v.clone(), fold_div, num_segments), (x,))
    assert torch.autograd.gradcheck(lambda v: torch.ops.epamx._temporal_shift_backward(v, fold_div, num_segments),
                                    (x,))
    assert torch.autograd.gradgradcheck(lambda v: temporal_shift_(v.clone(), fold_div, num_segments), (x,))
    assert torch.autograd.gradgradcheck(
        lambda v: torch.ops.epamx._temporal_shift_backward(v, fold_div, num_segments), (x,))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inplace_autograd_matches_out_of_place(layout, dtype, device):
    x, fold_div, num_segments = make_input((2, 16, 5, 3, 3, 4), layout, dtype, device)
    weight, _, _ = make_input((2, 16, 5, 3, 3, 4), layout, dtype, device, seed=5)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    (temporal_shift(a * 2, fold_div, num_segments) * weight).sum().backward()
    y = b * 2
    temporal_shift_(y, fold_div, num_segments)
    (y * weight).sum().backward()
    assert_bitwise_equal(b.grad, a.grad)


def test_inplace_on_leaf_requiring_grad_is_refused():
    x = torch.randn(1, 8, 3, 2, 2, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        temporal_shift_(x, 4)


# ---- dispatcher, fake kernels, torch.compile ---------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout, device):
    x, fold_div, num_segments = make_input((2, 16, 4, 3, 5, 4), layout, torch.float32, device)
    torch.library.opcheck(torch.ops.epamx.temporal_shift.default, (x, fold_div, num_segments))
    torch.library.opcheck(torch.ops.epamx.temporal_shift.default, (x.clone().requires_grad_(True), fold_div,
                                                                   num_segments))
    torch.library.opcheck(torch.ops.epamx._temporal_shift_backward.default, (x, fold_div, num_segments))
    torch.library.opcheck(torch.ops.epamx.temporal_shift_.default, (x.clone(), fold_div, num_segments))


def test_meta_tensors():
    x = torch.empty(2, 16, 4, 3, 5, device="meta")
    assert temporal_shift(x, 4).shape == x.shape
    assert torch.ops.epamx.temporal_shift(torch.empty(8, 16, 3, 5, device="meta"), 4, 4).shape == (8, 16, 3, 5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend, device):
    def f(v):
        return temporal_shift(v.sin(), 4).cos() * 2

    x, _, _ = make_input((2, 16, 5, 3, 3, 4), "NCTHW", torch.float32, device)
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    torch.testing.assert_close(compiled(a), f(b))
    compiled(a).sum().backward()
    f(b).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_compile_fullgraph_inplace_and_dynamic_shapes(device):
    def f(v, t):
        y = v * 2
        temporal_shift_(y, 4, t)
        return y + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for nt, t in [(8, 4), (12, 3)]:
        x, _, _ = make_input((nt // t, 16, t, 3, 3, 4), "(NT)CHW", torch.float32, device)
        torch.testing.assert_close(compiled(x, t), f(x, t), rtol=0, atol=0)


def test_compile_fullgraph_inplace_with_autograd(device):
    def f(v):
        y = v * 2
        temporal_shift_(y, 4)
        return (y * y).sum()

    x, _, _ = make_input((1, 16, 4, 3, 3, 4), "NCTHW", torch.float32, device)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    torch.compile(f, fullgraph=True, backend="aot_eager")(a).backward()
    f(b).backward()
    torch.testing.assert_close(a.grad, b.grad)


# ---- edge cases --------------------------------------------------------------------------------------------------

def test_single_frame_zeroes_the_shifted_channels(device):
    x, fold_div, _ = make_input((2, 16, 1, 3, 3, 4), "NCTHW", torch.float32, device)
    out = temporal_shift(x, fold_div)
    assert (out[:, :8] == 0).all()
    assert_bitwise_equal(out[:, 8:], x[:, 8:])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_fold_of_zero_is_refused(layout, device):
    # fold = C // fold_div = 0 would leave the input as it is, which nobody asks a shift for.
    x, _, num_segments = make_input((2, 8, 5, 3, 3, 9), layout, torch.float32, device)
    ops = [temporal_shift, lambda v, f, s: temporal_shift_(v.clone(), f, s), temporal_unshift_,
           torch.ops.epamx._temporal_shift_backward]
    for op in ops:
        with pytest.raises(ValueError, match="fold = C // fold_div = 8 // 9 = 0 shifts no channel"):
            op(x, 9, num_segments)
    assert_bitwise_equal(temporal_shift(x, 8, num_segments), temporal_shift_reference(x, 8, num_segments))


@pytest.mark.parametrize("shape,num_segments", [((0, 16, 4, 3, 3), None), ((2, 16, 4, 0, 3), None),
                                                ((2, 0, 4, 3, 3), None), ((2, 16, 0, 3, 3), None),
                                                ((0, 16, 3, 3), 4), ((8, 16, 3, 0), 4)])
def test_empty_tensors(shape, num_segments, device):
    x = torch.randn(shape, device=device, requires_grad=True)
    out = temporal_shift(x, 4, num_segments)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    y = x.detach().clone()
    temporal_shift_(y, 4, num_segments)
    assert y.shape == x.shape


# ---- bad input ---------------------------------------------------------------------------------------------------

BAD_INPUTS = [
    ("3-D", lambda d: temporal_shift(torch.randn(4, 8, 3, device=d)), ValueError, "5-D .* or 4-D"),
    ("6-D", lambda d: temporal_shift(torch.randn(1, 2, 8, 3, 3, 3, device=d)), ValueError, "got 6-D"),
    ("int dtype", lambda d: temporal_shift(torch.ones(1, 8, 3, 2, 2, dtype=torch.int32, device=d)), TypeError,
     "input must be a floating tensor"),
    ("fold_div 0", lambda d: temporal_shift(torch.randn(1, 8, 3, 2, 2, device=d), 0), ValueError,
     "fold_div must be >= 1, got 0"),
    ("fold > C/2", lambda d: temporal_shift(torch.randn(1, 8, 3, 2, 2, device=d), 1), ValueError,
     "fold = C // fold_div = 8 // 1 = 8 must be at most C / 2"),
    ("4-D without num_segments", lambda d: temporal_shift(torch.randn(6, 8, 2, 2, device=d)), ValueError,
     "num_segments .* is required for a 4-D input"),
    ("num_segments 0", lambda d: temporal_shift(torch.randn(6, 8, 2, 2, device=d), 4, 0), ValueError,
     "num_segments must be >= 1, got 0"),
    ("N*T not divisible", lambda d: temporal_shift(torch.randn(7, 8, 2, 2, device=d), 4, 3), ValueError,
     "N\\*T = 7 must be divisible by num_segments = 3"),
    ("5-D with other num_segments", lambda d: temporal_shift(torch.randn(1, 8, 3, 2, 2, device=d), 4, 5),
     ValueError, "num_segments must be None"),
    ("in place, int dtype", lambda d: temporal_shift_(torch.ones(1, 8, 3, 2, 2, dtype=torch.int64, device=d)),
     TypeError, "temporal_shift_: input must be a floating tensor"),
    ("fold_div a float", lambda d: temporal_shift(torch.randn(1, 8, 3, 2, 2, device=d), 2.5), TypeError,
     "temporal_shift: fold_div must be an int, got float 2.5"),
    ("in place, fold_div a float", lambda d: temporal_shift_(torch.randn(1, 8, 3, 2, 2, device=d), 4.0), TypeError,
     "temporal_shift_: fold_div must be an int, got float 4.0"),
    ("num_segments a float", lambda d: temporal_shift(torch.randn(6, 8, 2, 2, device=d), 4, 3.0), TypeError,
     "temporal_shift: num_segments must be an int, got float 3.0"),
    ("unshift, fold_div a string", lambda d: temporal_unshift_(torch.randn(1, 8, 3, 2, 2, device=d), "4"), TypeError,
     "temporal_unshift_: fold_div must be an int, got str '4'"),
    ("backward, fold_div 0", lambda d: torch.ops.epamx._temporal_shift_backward(torch.randn(1, 8, 3, 2, 2, device=d),
                                                                                0, None), ValueError, "fold_div"),
]


@pytest.mark.parametrize("call,error,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_explained(call, error, message, device):
    with pytest.raises(error, match=message):
        call(device)


# ---- the module --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("inplace", [False, True])
def test_module(inplace, device):
    x, _, _ = make_input((2, 16, 5, 3, 3, 4), "NCTHW", torch.float32, device)
    shift = TemporalShift(fold_div=4, inplace=inplace)
    y = x.clone()
    out = shift(y)
    assert (out is y) == inplace
    assert_bitwise_equal(out, temporal_shift_reference(x, 4))
    for fact in ("fold_div=4", f"inplace={inplace}", "layout='NCTHW'"):
        assert fact in repr(shift), repr(shift)
    assert shift.state_dict() == {}


def test_module_tsm_layout(device):
    x, _, _ = make_input((2, 16, 5, 3, 3, 8), "(NT)CHW", torch.float32, device)
    shift = torch.nn.Sequential(TemporalShift(fold_div=8, layout="(NT)CHW", num_segments=5))
    assert_bitwise_equal(shift(x), temporal_shift_reference(x, 8, 5))
    assert "num_segments=5" in repr(shift)


@pytest.mark.parametrize("kwargs,message", [
    (dict(fold_div=0), "fold_div must be an int >= 1, got 0"),
    (dict(layout="NTCHW"), "layout must be one of"),
    (dict(layout="(NT)CHW"), "needs num_segments"),
    (dict(num_segments=4), "num_segments is only used with layout"),
])
def test_module_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TemporalShift(**kwargs)


def test_module_checks_input_rank():
    with pytest.raises(ValueError, match=r"expects a 5-D input \(N, C, T, H, W\), got shape \(8, 16, 3, 3\)"):
        TemporalShift(4)(torch.randn(8, 16, 3, 3))


# ---- CUDA specifics ------------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA GPU")


@cuda_only
def test_cuda_uses_the_current_stream():
    src = torch.randn(4, 32, 16, 28, 28, device="cuda")
    out, y = on_busy_side_stream(lambda x: (temporal_shift(x, 8), temporal_shift_(x.clone(), 8)), src)
    expected = temporal_shift_reference(src, 8)
    assert_bitwise_equal(out, expected)
    assert_bitwise_equal(y, expected)


@cuda_only
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_device_guard():
    x = torch.randn(2, 16, 4, 5, 5, device="cuda:1")
    with torch.cuda.device(0):
        out = temporal_shift(x, 4)
    assert out.device == x.device
    assert_bitwise_equal(out, temporal_shift_reference(x, 4))


@cuda_only
@pytest.mark.slow
def test_cuda_64bit_indexing():
    x = torch.randn(1, 4, 2, 16384, 16400, device="cuda", dtype=torch.float16)  # 2^31 + elements
    assert x.numel() > 2**31
    expected = temporal_shift_reference(x, 2)
    assert_bitwise_equal(temporal_shift(x, 2), expected)
    temporal_shift_(x, 2)
    assert_bitwise_equal(x, expected)


# ---- the in-place opposite shift, and exact restoring ------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_unshift_in_place_is_the_backward_op(layout, dtype, device):
    x, fold_div, num_segments = make_input((2, 17, 5, 3, 4, 4), layout, dtype, device)
    y = x.clone()
    assert temporal_unshift_(y, fold_div, num_segments) is y
    assert_bitwise_equal(y, torch.ops.epamx._temporal_shift_backward(x, fold_div, num_segments))


@pytest.mark.parametrize("shape", ALL_SHAPES, ids=_shape_id)
def test_shifted_in_place_restores_exactly(shape, device):
    x, fold_div, _ = make_input(shape, "NCTHW", torch.float32, device)
    original = x.clone()
    shift = TemporalShift(fold_div)
    with shift.shifted_in_place(x) as shifted:
        assert shifted is x
        assert_bitwise_equal(x, temporal_shift_reference(original, fold_div))
    assert_bitwise_equal(x, original)


def test_module_reference_path(device):
    x, _, _ = make_input((2, 16, 5, 3, 3, 4), "NCTHW", torch.float32, device)
    shift = TemporalShift(4, fused=False)
    assert_bitwise_equal(shift(x), temporal_shift(x, 4))
    assert "fused=False" in repr(shift)
