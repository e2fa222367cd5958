"""attention_reweight against the authors' eager composition x + x * (S * A), evaluated in float64."""
import pytest
import torch
from torch._prims_common import suggest_memory_format

from epamx import _C
from epamx.ops import attention_reweight, attention_reweight_reference
from testkit import DEVICES, TOLERANCES, poisoned_allocations

# (N, C, T, H, W): EPAM-Net's last RGB stage, odd C and T, H != W, single channel / frame / pixel; C and H*W that
# leave the CPU kernels' vectors (8 to 16 lanes) a partial last one in either memory format, and frames of more
# than 1024 positions (the NCTHW kernels' block, split in pieces).
SHAPES = [(2, 432, 16, 7, 7), (1, 17, 3, 5, 3), (3, 1, 5, 2, 4), (2, 9, 1, 1, 1), (1, 33, 7, 14, 14),
          (2, 37, 3, 5, 7), (1, 5, 2, 33, 35)]
# Memory formats of x (and of the incoming gradient): the kernels read both natively, and out and dx follow x.
LAYOUTS = ["contiguous", "channels_last"]


def _id(shape):
    return "x".join(map(str, shape))


def lay_out(t, layout):
    return t.contiguous(memory_format=torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format)


def assert_format_of(result, x):
    """result has x's memory format, with the strides the fake kernel gives it."""
    expected = torch.empty(result.shape, memory_format=suggest_memory_format(x))
    assert result.stride() == expected.stride(), (result.stride(), expected.stride())


def make_inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    n, c, t, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    spatial = torch.rand(n, 1, t, h, w, generator=g)  # sigmoid outputs live in (0, 1)
    temporal = torch.rand(n, 1, t, 1, 1, generator=g)
    return [v.to(device=device, dtype=dtype) for v in (x, spatial, temporal)]


def reference64(x, spatial, temporal):
    return attention_reweight_reference(x.double(), spatial.double(), temporal.double())


def close(actual, expected, dtype):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_forward_matches_reference(shape, layout, dtype, device):
    x, s, a = make_inputs(shape, dtype, device)
    x = lay_out(x, layout)
    with poisoned_allocations():
        out = attention_reweight(x, s, a)
    assert out.dtype == dtype and out.shape == x.shape
    assert_format_of(out, x)
    close(out, reference64(x, s, a), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_backward_matches_reference(shape, layout, dtype, device):
    x, s, a = make_inputs(shape, dtype, device)
    x = lay_out(x, layout)
    grad = lay_out(torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(device=device, dtype=dtype),
                   layout)
    leaves = [v.double().requires_grad_(True) for v in (x, s, a)]
    expected = torch.autograd.grad(attention_reweight_reference(*leaves), leaves, grad.double())
    with poisoned_allocations():
        actual = torch.ops.epamx._attention_reweight_backward(grad, x, s, a)
    assert_format_of(actual[0], x)
    # dS and dA sum over C (and H*W) products: allow for that many roundings of the inputs.
    scale = 1 + shape[1] * shape[3] * shape[4] ** 0.5
    rtol, atol = TOLERANCES[dtype]
    for act, exp in zip(actual, expected):
        assert act.dtype == dtype
        torch.testing.assert_close(act.double(), exp, rtol=rtol * scale, atol=atol * scale)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_temporal_gradient_over_a_large_frame(layout, device):
    # dA sums a frame's 61 x 67 per-position terms of a few channels (large and of both signs): in either memory
    # format the float32 result is within 1e-6 of the largest |dA| from the exact sum (a plain float32 running
    # sum in channels-last memory drifted 5.7e-6; the CUDA kernels' trees stay within 2e-7).
    shape = (1, 3, 2, 61, 67)
    x, s, a = make_inputs(shape, torch.float32, device)
    x = lay_out(x, layout)
    grad = lay_out(torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(device), layout)
    leaves = [v.double().requires_grad_(True) for v in (x, s, a)]
    expected = torch.autograd.grad(attention_reweight_reference(*leaves), leaves, grad.double())[2]
    da = torch.ops.epamx._attention_reweight_backward(grad, x, s, a)[2]
    err = (da.double() - expected).abs().max().item()
    assert err <= 1e-6 * expected.abs().max().item(), f"dA is {err:.3g} from the exact sum"


def test_gradient_in_another_memory_format_than_x(device):
    x, s, a = make_inputs((2, 20, 3, 4, 5), torch.float32, device)
    grad = torch.randn_like(x)
    expected = torch.ops.epamx._attention_reweight_backward(grad, x, s, a)
    for x_layout, grad_layout in [("contiguous", "channels_last"), ("channels_last", "contiguous")]:
        actual = torch.ops.epamx._attention_reweight_backward(lay_out(grad, grad_layout), lay_out(x, x_layout), s, a)
        assert_format_of(actual[0], lay_out(x, x_layout))
        for act, exp in zip(actual, expected):
            torch.testing.assert_close(act, exp)


def test_non_contiguous_inputs(device):
    x, s, a = make_inputs((2, 6, 5, 4, 3), torch.float32, device)
    x_nc = x.transpose(1, 2).contiguous().transpose(1, 2)
    s_nc = s.expand(2, 1, 5, 4, 3)[..., :]
    a_nc = torch.rand(2, 1, 10, 1, 1, device=device)[:, :, ::2]
    assert not x_nc.is_contiguous() and not a_nc.is_contiguous()
    close(attention_reweight(x_nc, s_nc, a_nc), reference64(x_nc, s_nc, a_nc), torch.float32)
    x2 = x_nc.clone().requires_grad_(True)
    attention_reweight(x2, s_nc, a_nc).sum().backward()
    close(x2.grad, (1 + s_nc.double() * a_nc.double()).expand_as(x2), torch.float32)


@pytest.mark.parametrize("view", ["channel_slice", "transposed", "channels_last_slice", "channels_last_crop"])
def test_strided_views_keep_their_memory_format(view, device):
    base = make_inputs((2, 12, 8, 5, 4), torch.float32, device)[0]
    cl = base.contiguous(memory_format=torch.channels_last_3d)
    x = {"channel_slice": base[:, ::2], "transposed": base.transpose(3, 4),
         "channels_last_slice": cl[:, ::2], "channels_last_crop": cl[:, 1:10, :, 1:]}[view]
    _, s, a = make_inputs(x.shape, torch.float32, device, seed=1)
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last_3d)
    out = attention_reweight(x, s, a)
    assert_format_of(out, x)
    close(out, reference64(x, s, a), torch.float32)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(device)
    leaves = [v.double().requires_grad_(True) for v in (x, s, a)]
    expected = torch.autograd.grad(attention_reweight_reference(*leaves), leaves, grad.double())
    actual = torch.ops.epamx._attention_reweight_backward(grad, x, s, a)
    assert_format_of(actual[0], x)
    # dS and dA sum over C (and H*W) products, as in test_backward_matches_reference (with the test's grad drawn
    # from the global generator, a cancelling sum of 240 products once missed the unscaled tolerance)
    scale = 1 + x.shape[1] * x.shape[3] * x.shape[4] ** 0.5
    rtol, atol = TOLERANCES[torch.float32]
    for act, exp in zip(actual, expected):
        torch.testing.assert_close(act.double(), exp, rtol=rtol * scale, atol=atol * scale)


def test_gradcheck_fp64(device):
    x, s, a = [v.requires_grad_(True) for v in make_inputs((2, 5, 3, 4, 3), torch.float64, device)]
    assert torch.autograd.gradcheck(attention_reweight, (x, s, a))


def test_gradgradcheck_fp64(device):
    x, s, a = [v.requires_grad_(True) for v in make_inputs((2, 5, 3, 4, 3), torch.float64, device)]
    assert torch.autograd.gradgradcheck(attention_reweight, (x, s, a))
    # The backward op on its own, through all four of its inputs, and its backward in turn (third order).
    grad = torch.randn_like(x).requires_grad_(True)
    backward = torch.ops.epamx._attention_reweight_backward
    assert torch.autograd.gradcheck(backward, (grad, x, s, a))
    assert torch.autograd.gradgradcheck(backward, (grad, x, s, a))


def test_second_derivatives_match_the_reference(device):
    # The Hessian-vector products of a scalar loss, against the same composition in plain torch ops.
    def hvp(fn, inputs, vectors):
        inputs = [v.detach().clone().requires_grad_(True) for v in inputs]
        grads = torch.autograd.grad((fn(*inputs) ** 2).sum(), inputs, create_graph=True)
        return torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vectors)), inputs)

    inputs = make_inputs((2, 6, 4, 3, 5), torch.float64, device)
    vectors = [torch.randn_like(v) for v in inputs]
    for act, exp in zip(hvp(attention_reweight, inputs, vectors), hvp(attention_reweight_reference, inputs, vectors)):
        close(act, exp, torch.float64)


@pytest.mark.parametrize("groups", [1, 2, 5, 17])
def test_gpu_thread_bodies_are_order_independent(groups):
    x, s, a = make_inputs((2, 17, 3, 5, 3))
    grad = torch.randn_like(x)
    expected = torch.ops.epamx._attention_reweight_backward(grad, x, s, a)
    n_threads = groups * 2 * 3 * 15
    g = torch.Generator().manual_seed(groups)
    for order1, order2 in [(torch.arange(n_threads), torch.arange(6)),
                           (torch.arange(n_threads).flip(0), torch.arange(6).flip(0)),
                           (torch.randperm(n_threads, generator=g), torch.randperm(6, generator=g))]:
        with poisoned_allocations():
            actual = _C._testing.attention_reweight_backward_run_thread_bodies(grad, x, s, a, groups, order1, order2)
        for act, exp in zip(actual, expected):
            torch.testing.assert_close(act, exp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 17, 3, 5, 3), (2, 3, 3, 5, 3), (1, 40, 2, 2, 3), (2, 1, 2, 3, 1)], ids=_id)
def test_gpu_thread_bodies_channels_last_3d(shape):
    # The NTHWC bodies: a team of lanes per position (C = 17: 32 lanes, 15 idle; C = 3: 4 lanes; C = 40: 32 lanes,
    # 8 of them with two channels; C = 1: one lane), the lanes' sums of g*x added by the GPU's butterfly.
    x, s, a = make_inputs(shape)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    grad = torch.randn_like(x)
    assert grad.is_contiguous(memory_format=torch.channels_last_3d)
    expected = torch.ops.epamx._attention_reweight_backward(grad, x, s, a)
    n, _, t, h, w = shape
    positions, frames = n * t * h * w, n * t
    g = torch.Generator().manual_seed(1)
    hook = _C._testing.attention_reweight_backward_run_thread_bodies
    for order1, order2 in [(torch.arange(positions), torch.arange(frames)),
                           (torch.randperm(positions, generator=g), torch.randperm(frames, generator=g))]:
        with poisoned_allocations():
            actual = hook(grad, x, s, a, 1, order1, order2)
        assert_format_of(actual[0], x)
        for act, exp in zip(actual, expected):
            torch.testing.assert_close(act, exp, rtol=1e-5, atol=1e-5)
    if shape[1] > 1:
        with pytest.raises(ValueError, match="takes one group"):
            hook(grad, x, s, a, 2, torch.arange(2 * positions), torch.arange(frames))


def test_thread_body_hook_checks_its_orders():
    x, s, a = make_inputs((1, 2, 2, 1, 3))
    grad = torch.randn_like(x)
    hook = _C._testing.attention_reweight_backward_run_thread_bodies
    with pytest.raises(ValueError, match="order1 must list 6 threads and order2 2"):
        hook(grad, x, s, a, 1, torch.arange(5), torch.arange(2))
    with pytest.raises(ValueError, match="order1 index 6 out of range"):
        hook(grad, x, s, a, 1, torch.arange(6) + 1, torch.arange(2))
    with pytest.raises(RuntimeError, match="order1 must be a cpu tensor"):
        hook(grad, x, s, a, 1, torch.arange(6, device="meta"), torch.arange(2))
    with pytest.raises(RuntimeError, match="order2 must be a cpu tensor"):
        hook(grad, x, s, a, 1, torch.arange(6), torch.arange(2, device="meta"))


def test_mixed_dtypes_as_autocast_makes_them(device):
    x, s, a = make_inputs((2, 8, 4, 3, 3), torch.bfloat16, device)
    s32 = s.float().requires_grad_(True)
    a32 = a.float().requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    out = attention_reweight(xg, s32, a32)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert xg.grad.dtype == torch.bfloat16 and s32.grad.dtype == torch.float32 and a32.grad.dtype == torch.float32
    close(out, reference64(x, s, a), torch.bfloat16)


def test_under_autocast(device):
    conv = torch.nn.Conv3d(4, 1, 1).to(device)
    x = torch.randn(2, 4, 3, 5, 5, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        spatial = torch.sigmoid(conv(x))
        temporal = spatial.mean(dim=(3, 4), keepdim=True)
        out = attention_reweight(x, spatial, temporal)
    assert out.dtype == x.dtype
    close(out, reference64(x, spatial, temporal), torch.bfloat16)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout, device):
    # The fake kernels must give out and dx the strides the kernels do, in either memory format.
    x, s, a = make_inputs((2, 6, 3, 4, 5), torch.float32, device)
    x = lay_out(x, layout)
    torch.library.opcheck(torch.ops.epamx.attention_reweight.default, (x, s, a))
    torch.library.opcheck(torch.ops.epamx.attention_reweight.default,
                          tuple(v.clone().requires_grad_(True) for v in (x, s, a)))
    torch.library.opcheck(torch.ops.epamx._attention_reweight_backward.default, (torch.randn_like(x), x, s, a))
    torch.library.opcheck(torch.ops.epamx._attention_reweight_backward.default,
                          tuple(v.clone().requires_grad_(True) for v in (torch.randn_like(x), x, s, a)))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend, device):
    def f(x, s, a):
        return attention_reweight(x.cos(), torch.sigmoid(s), a).sum()

    x, s, a = make_inputs((2, 6, 3, 4, 5), torch.float32, device)
    eager = [v.clone().requires_grad_(True) for v in (x, s, a)]
    compiled = [v.clone().requires_grad_(True) for v in (x, s, a)]
    f(*eager).backward()
    torch.compile(f, fullgraph=True, backend=backend)(*compiled).backward()
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c.grad, e.grad)


@pytest.mark.parametrize("shape", [(0, 4, 3, 2, 2), (2, 0, 3, 2, 2), (2, 4, 0, 2, 2), (2, 4, 3, 0, 2)])
def test_empty_tensors(shape, device):
    x, s, a = [v.requires_grad_(True) for v in make_inputs(shape, torch.float32, device)]
    out = attention_reweight(x, s, a)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape and s.grad.shape == s.shape and a.grad.shape == a.shape
    assert (s.grad == 0).all() and (a.grad == 0).all()


def _bad(x=(2, 4, 3, 5, 6), s=(2, 1, 3, 5, 6), a=(2, 1, 3, 1, 1), dtype=torch.float32, s_dtype=None):
    def call(device):
        return torch.ops.epamx.attention_reweight(torch.randn(x, device=device).to(dtype),
                                                  torch.rand(s, device=device).to(s_dtype or dtype),
                                                  torch.rand(a, device=device).to(dtype))
    return call


BAD_INPUTS = [
    ("x 4-D", _bad(x=(2, 4, 3, 5)), ValueError, r"x must be 5-D \(N, C, T, H, W\)"),
    ("spatial with channels", _bad(s=(2, 4, 3, 5, 6)), ValueError,
     r"spatial must have shape \(N, 1, T, H, W\) = \(2, 1, 3, 5, 6\)"),
    ("spatial T mismatch", _bad(s=(2, 1, 4, 5, 6)), ValueError, "spatial must have shape"),
    ("spatial H/W swapped", _bad(s=(2, 1, 3, 6, 5)), ValueError, "spatial must have shape"),
    ("temporal not pooled", _bad(a=(2, 1, 3, 5, 6)), ValueError,
     r"temporal must have shape \(N, 1, T, 1, 1\) = \(2, 1, 3, 1, 1\)"),
    ("temporal N mismatch", _bad(a=(1, 1, 3, 1, 1)), ValueError, "temporal must have shape"),
    ("integer x", _bad(dtype=torch.int32), TypeError, "x must be a floating tensor"),
    ("mixed dtypes to the raw op", _bad(s_dtype=torch.float64), TypeError, "spatial and temporal must have x's dtype"),
]


@pytest.mark.parametrize("call,error,message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_explained(call, error, message, device):
    with pytest.raises(error, match=message):
        call(device)


def test_backward_rejects_bad_grad():
    x, s, a = make_inputs((2, 4, 3, 2, 2))
    with pytest.raises(ValueError, match="grad must have x's shape"):
        torch.ops.epamx._attention_reweight_backward(torch.randn(2, 4, 3, 2, 1), x, s, a)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA GPU")
def test_cuda_rejects_maps_on_another_device():
    x, s, a = make_inputs((2, 4, 3, 2, 2), torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="x and spatial must be on the same device"):
        torch.ops.epamx.attention_reweight(x, s.cpu(), a)
