"""Every CUDA kernel against the CPU kernel on the same inputs: forward and gradients, every float dtype, odd sizes,
non-contiguous and channels-last inputs, the current (side) stream, and the int32 index boundary. CUDA only: the
whole module is skipped without a GPU (tools/gpu_check.sh runs it on one, the tests marked slow in a process of
their own: each holds several GiB)."""
import pytest
import torch

from epamx.ops import COCO17_LIMBS, attention_reweight, channel_pool, render_heatmaps, temporal_shift, temporal_shift_
from epamx.ops.batch_norm_act import ACTIVATIONS, batch_norm_act
from testkit import DEVICES, FLOAT_DTYPES, TOLERANCES, on_busy_side_stream, poisoned_allocations

pytestmark = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA GPU")

DTYPE_IDS = [str(d).replace("torch.", "") for d in FLOAT_DTYPES]
# How an input is laid out in memory: as allocated, a strided view (every other W column of a wider tensor), or
# channels-last (C innermost); batch_norm_act's kernels also tell apart "transposed" (dense, H and W swapped).
LAYOUTS = ["contiguous", "strided", "channels_last"]
# attention_reweight and channel_pool read NCTHW or channels-last memory in place and copy anything else into the
# format it suggests: also dense H/W-transposed memory (copied to NCTHW) and a strided view of channels-last memory
# (copied to channels-last).
NATIVE_LAYOUTS = LAYOUTS + ["transposed", "channels_last_strided"]


def randn(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def rand(shape, seed, dtype=torch.float32):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def lay_out(t, layout):
    """The same values as t (5-D, any device), laid out as `layout` names."""
    if layout == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last_3d)
    if layout == "transposed":
        return t.transpose(3, 4).contiguous().transpose(3, 4)
    if layout == "channels_last_strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide = wide.contiguous(memory_format=torch.channels_last_3d)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def both_devices(tensors, layout):
    """(CPU inputs, CUDA inputs): the same values, each laid out as `layout` on its device."""
    return [lay_out(t, layout) for t in tensors], [lay_out(t.cuda(), layout) for t in tensors]


def close(cuda, cpu, dtype, exact=False):
    # Same per-element math on both; nvcc may fuse multiply-adds where GCC does not, and sums may be grouped
    # differently: an ulp or two in the output dtype.
    rtol, atol = (0, 0) if exact else TOLERANCES[dtype]
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=rtol, atol=atol, equal_nan=True)


def grads(fn, inputs, grad_out, differentiable):
    leaves = [t.detach().clone().requires_grad_(d) for t, d in zip(inputs, differentiable)]
    out = fn(*leaves)
    wanted = [t for t in leaves if t.requires_grad]
    return out.detach(), torch.autograd.grad(out, wanted, grad_out)


# ---- temporal_shift: moves data only, so CUDA and CPU agree bit for bit ------------------------------------------

SHIFT_SHAPES = [(2, 16, 16, 7, 7, 8), (1, 17, 3, 5, 3, 4), (3, 9, 1, 2, 5, 2), (2, 7, 2, 3, 1, 3), (1, 24, 48, 4, 4, 4)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHIFT_SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"-fd{s[5]}")
def test_temporal_shift(shape, dtype, layout):
    *size, fold_div = shape
    (x_cpu,), (x_gpu,) = both_devices([randn(size, 1, dtype)], layout)
    grad = randn(size, 2, dtype)
    out_cpu, (dx_cpu,) = grads(lambda x: temporal_shift(x, fold_div), [x_cpu], grad, [True])
    with poisoned_allocations():
        out_gpu, (dx_gpu,) = grads(lambda x: temporal_shift(x, fold_div), [x_gpu], grad.cuda(), [True])
    close(out_gpu, out_cpu, dtype, exact=True)
    close(dx_gpu, dx_cpu, dtype, exact=True)
    assert out_gpu.is_contiguous(memory_format=torch.channels_last_3d) == out_cpu.is_contiguous(
        memory_format=torch.channels_last_3d)
    # In place, on the caller's tensor whatever its layout, and the in-place opposite shift.
    y_cpu, y_gpu = x_cpu.clone(), x_gpu.clone()
    temporal_shift_(y_cpu, fold_div)
    temporal_shift_(y_gpu, fold_div)
    close(y_gpu, y_cpu, dtype, exact=True)
    torch.ops.epamx._temporal_shift_backward_(y_cpu, fold_div, None)
    torch.ops.epamx._temporal_shift_backward_(y_gpu, fold_div, None)
    close(y_gpu, y_cpu, dtype, exact=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_temporal_shift_tsm_layout(dtype):
    n, t, c, h, w = 3, 5, 19, 3, 5
    x = randn((n * t, c, h, w), 3, dtype)
    for x_cpu in [x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3)]:
        x_gpu = x_cpu.cuda()
        close(temporal_shift(x_gpu, 4, t), temporal_shift(x_cpu, 4, t), dtype, exact=True)
        y_cpu, y_gpu = x_cpu.clone(), x_gpu.clone()
        temporal_shift_(y_cpu, 4, t)
        temporal_shift_(y_gpu, 4, t)
        close(y_gpu, y_cpu, dtype, exact=True)


def test_temporal_shift_on_a_side_stream_backward():
    x = randn((2, 16, 8, 9, 9), 4)
    out = on_busy_side_stream(lambda g: torch.ops.epamx._temporal_shift_backward(g, 8, None), x.cuda())
    close(out, torch.ops.epamx._temporal_shift_backward(x, 8, None), torch.float32, exact=True)


# ---- attention_reweight ------------------------------------------------------------------------------------------

# In channels-last memory a position's channels go to a team of lanes: 32 for C >= 17 (C = 432: 13 or 14 channels a
# lane, C = 33: lane 0 takes two, C = 17: 15 lanes idle), 16 for C = 9, 4 for C = 3, 1 for C = 1.
REWEIGHT_SHAPES = [(2, 432, 16, 7, 7), (1, 17, 3, 5, 3), (3, 1, 5, 2, 4), (2, 9, 1, 1, 1), (1, 33, 7, 14, 14),
                   (1, 3, 2, 61, 67)]


def reweight_inputs(shape, dtype, seed=0):
    n, c, t, h, w = shape
    return [randn(shape, seed, dtype), rand((n, 1, t, h, w), seed + 1, dtype), rand((n, 1, t, 1, 1), seed + 2, dtype)]


@pytest.mark.parametrize("layout", NATIVE_LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", REWEIGHT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_reweight(shape, dtype, layout):
    inputs_cpu, inputs_gpu = both_devices(reweight_inputs(shape, dtype), layout)
    grad = randn(shape, 7, dtype)
    out_cpu, grads_cpu = grads(attention_reweight, inputs_cpu, grad, [True] * 3)
    with poisoned_allocations():
        out_gpu, grads_gpu = grads(attention_reweight, inputs_gpu, grad.cuda(), [True] * 3)
    close(out_gpu, out_cpu, dtype)
    # out and dx take x's memory format on both devices (the fake kernel's strides).
    assert out_gpu.stride() == out_cpu.stride() and grads_gpu[0].stride() == grads_cpu[0].stride()
    for gpu, cpu in zip(grads_gpu, grads_cpu):
        # dS and dA are sums over channels (and pixels): relative to their size.
        scale = cpu.abs().max().clamp_min(1).item()
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(gpu.cpu().double(), cpu.double(), rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_attention_reweight_on_a_side_stream(layout):
    x, s, a = [t.cuda() for t in reweight_inputs((2, 432, 16, 7, 7), torch.float32)]
    x = lay_out(x, layout)
    grad = lay_out(torch.randn_like(x), layout)
    out = on_busy_side_stream(attention_reweight, x, s, a)
    close(out, attention_reweight(x.cpu(), s.cpu(), a.cpu()), torch.float32)
    # The backward pass is two kernels (per-group or per-team partial sums, then the per-frame reduction) and a
    # scratch buffer.
    dx, ds, da = on_busy_side_stream(torch.ops.epamx._attention_reweight_backward, grad, x, s, a)
    expected = torch.ops.epamx._attention_reweight_backward(grad.cpu(), x.cpu(), s.cpu(), a.cpu())
    for gpu, cpu in zip((dx, ds, da), expected):
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_attention_reweight_backward_is_deterministic(layout, dtype):
    # dS and dA are sums over channels and pixels, taken in an order fixed by the shape: two runs agree bit for bit.
    x, s, a = [lay_out(t.cuda(), layout) if t.shape[1] > 1 else t.cuda()
               for t in reweight_inputs((12, 432, 16, 7, 7), dtype, seed=3)]
    grad = lay_out(randn(x.shape, 4, dtype).cuda(), layout)
    first = torch.ops.epamx._attention_reweight_backward(grad, x, s, a)
    second = torch.ops.epamx._attention_reweight_backward(grad, x, s, a)
    for one, two in zip(first, second):
        assert torch.equal(one, two)
    assert first[0].is_contiguous(memory_format=torch.channels_last_3d) == (layout == "channels_last")


# ---- channel_pool ------------------------------------------------------------------------------------------------

# Channels-last teams of 32 lanes (C = 216: 6 or 7 channels a lane; 33, 17), 16 (C = 9), 8 (C = 5), 4 (C = 3), 1.
POOL_CASES = [((2, 216, 48, 7, 7), 3), ((1, 17, 7, 5, 3), 3), ((2, 9, 5, 2, 4), 2), ((3, 1, 4, 3, 3), 1),
              ((1, 5, 3, 1, 1), 4), ((2, 33, 16, 14, 14), 5), ((1, 3, 5, 2, 2), 2**32)]


@pytest.mark.parametrize("layout", NATIVE_LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-s{c[1]}")
def test_channel_pool(case, dtype, layout):
    shape, t_stride = case
    (x_cpu,), (x_gpu,) = both_devices([randn(shape, 3, dtype)], layout)
    out_shape = channel_pool(x_cpu, t_stride).shape
    grad = randn(out_shape, 4, dtype)
    out_cpu, (dx_cpu,) = grads(lambda x: channel_pool(x, t_stride), [x_cpu], grad, [True])
    with poisoned_allocations():
        out_gpu, (dx_gpu,) = grads(lambda x: channel_pool(x, t_stride), [x_gpu], grad.cuda(), [True])
    close(out_gpu[:, 0], out_cpu[:, 0], dtype, exact=True)  # the maximum is exact
    close(out_gpu[:, 1], out_cpu[:, 1], dtype)
    close(dx_gpu, dx_cpu, dtype)
    # The pooled output and dx take x's memory format on both devices (the fake kernel's strides).
    assert out_gpu.stride() == out_cpu.stride() and dx_gpu.stride() == dx_cpu.stride()


@pytest.mark.parametrize("channels", [6, 45], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_channel_pool_ties_and_nan_route_like_the_cpu_kernel(layout, channels):
    # Many ties (3 values): the first channel holding the maximum takes the max gradient, in channels-last memory
    # whichever lane of the team holds it (C = 45: lanes 0-12 hold two channels); the first NaN wins over all.
    x = torch.randint(0, 3, (2, channels, 4, 3, 3), generator=torch.Generator().manual_seed(1)).float()
    x[0, 2, 0, 1, 1] = float("nan")
    x[1, -1, 2, 0, 2] = x[1, 1, 2, 0, 2] = float("nan")
    x = lay_out(x, layout)
    grad = lay_out(randn((2, 2, 2, 3, 3), 2), layout)
    expected = torch.ops.epamx._channel_pool_backward(grad, x, 2)
    close(torch.ops.epamx._channel_pool_backward(grad.cuda(), x.cuda(), 2), expected, torch.float32, exact=True)
    close(channel_pool(x.cuda(), 2), channel_pool(x, 2), torch.float32, exact=True)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_channel_pool_on_a_side_stream(layout):
    x = lay_out(randn((2, 216, 48, 7, 7), 5).cuda(), layout)
    grad = lay_out(randn((2, 2, 16, 7, 7), 6).cuda(), layout)
    close(on_busy_side_stream(lambda v: channel_pool(v, 3), x), channel_pool(x.cpu(), 3), torch.float32)
    dx = on_busy_side_stream(lambda g, v: torch.ops.epamx._channel_pool_backward(g, v, 3), grad, x)
    close(dx, torch.ops.epamx._channel_pool_backward(grad.cpu(), x.cpu(), 3), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_channel_pool_is_deterministic(layout, dtype):
    # The mean sums channels in an order fixed by C (a lane tree in channels-last memory): two runs agree bit for bit.
    x = lay_out(randn((12, 216, 48, 7, 7), 7, dtype).cuda(), layout)
    grad = lay_out(randn((12, 2, 16, 7, 7), 8, dtype).cuda(), layout)
    assert torch.equal(channel_pool(x, 3), channel_pool(x, 3))
    back = torch.ops.epamx._channel_pool_backward
    assert torch.equal(back(grad, x, 3), back(grad, x, 3))


# ---- render_heatmaps ---------------------------------------------------------------------------------------------

def keypoints(n, m, t, v, size, seed):
    h, w = size
    kp = rand((n, m, t, v, 2), seed) * torch.tensor([w + 4.0, h + 4.0]) - 2  # some joints outside the image
    scores = rand((n, m, t, v), seed + 1)
    kp[0, 0, 0, 1] = float("nan")  # a missing joint
    scores[0, -1, -1, 2] = 0.0  # below eps
    return kp, scores


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("limbs", [None, COCO17_LIMBS], ids=["joints", "limbs"])
@pytest.mark.parametrize("size", [(56, 56), (23, 31), (1, 7)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_render_heatmaps(size, limbs, dtype):
    kp, scores = keypoints(3, 2, 5, 17, size, seed=8)
    cpu = render_heatmaps(kp, scores, size, 0.6, limbs, dtype=dtype)
    with poisoned_allocations():
        gpu = render_heatmaps(kp.cuda(), scores.cuda(), size, 0.6, limbs, dtype=dtype)
    close(gpu, cpu, dtype)


def test_render_heatmaps_strided_inputs():
    kp, scores = keypoints(2, 3, 4, 17, (23, 31), seed=9)
    # The same values through views whose persons and frames are transposed in memory.
    kp = kp.transpose(1, 2).contiguous().transpose(1, 2)
    scores = scores.transpose(1, 2).contiguous().transpose(1, 2)
    assert not kp.is_contiguous() and not scores.is_contiguous()
    cpu = render_heatmaps(kp, scores, (23, 31), limbs=COCO17_LIMBS)
    close(render_heatmaps(kp.cuda(), scores.cuda(), (23, 31), limbs=COCO17_LIMBS), cpu, torch.float32)


# ---- batch_norm_act: per-row sums in float64 (two passes of block reductions), elementwise affine + activation ---

# The reductions' launch plans (batch_norm_act.h, row_reduce_plan; contiguous / channels-last): rows shorter than a
# block, several a block ((2, 6, 3, 5, 7) two of 105 elements, (3, 1, 2, 4, 3), (2, 5, 4, 1, 1)); rows cut into slices
# whose partial sums a second pass adds ((2, 54, 2, 28, 28) 1 / 24 slices, (1, 3, 2, 61, 67) 2 / 6, (2, 3, 4, 56, 56)
# 3 / 9); C > 256, two channel tiles of 150 per sample in channels-last memory ((2, 300, 2, 3, 5)).
BN_SHAPES = [(2, 6, 3, 5, 7), (3, 1, 2, 4, 3), (2, 5, 4, 1, 1), (2, 54, 2, 28, 28), (1, 3, 2, 61, 67),
             (2, 3, 4, 56, 56), (2, 300, 2, 3, 5)]
BN_LAYOUTS = LAYOUTS + ["transposed"]
BN_ACTS = list(ACTIVATIONS)


def bn_coefficients(shape, dtype, seed):
    """scale, shift, coef_x, coef_1: (N, C) in the accumulation dtype the kernels take; some scales negative."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n, c = shape[:2]
    scale = (rand((n, c), seed) + 0.5) * torch.where(rand((n, c), seed + 1) < 0.2, -1, 1)
    return [scale.to(acc), (randn((n, c), seed + 2) * 0.3).to(acc), (randn((n, c), seed + 3) * 0.1).to(acc),
            (randn((n, c), seed + 4) * 0.1).to(acc)]


def rows_close(cuda, cpu, tol):
    """(N, C) float64 sums of the same terms in another order: relative to the largest."""
    scale = cpu.abs().max().clamp_min(1).item()
    torch.testing.assert_close(cuda.cpu() / scale, cpu / scale, rtol=tol, atol=tol)


def away_from_the_kink(grad, pre, act):
    """grad, zero where the ReLU's input is within rounding of 0: a fused multiply-add on one device and not on the
    other may put such an element on the other side, and its gradient with it."""
    return grad.masked_fill(pre.abs() < 1e-3, 0) if act == "relu" else grad


@pytest.mark.parametrize("act", BN_ACTS)
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_act_kernels(shape, dtype, layout, act):
    code = ACTIVATIONS[act]
    scale, shift, coef_x, coef_1 = coefs = bn_coefficients(shape, dtype, 3)
    x = randn(shape, 1, dtype)
    view = (*shape[:2], 1, 1, 1)
    grad = away_from_the_kink(randn(shape, 2, dtype), x.double() * scale.view(view) + shift.view(view), act)
    (x_cpu, grad_cpu), (x_gpu, grad_gpu) = both_devices([x, grad], layout)
    coefs_gpu = [t.cuda() for t in coefs]
    ops = torch.ops.epamx

    def run(x, grad, scale, shift, coef_x, coef_1):
        return (ops._channel_moments(x), ops.affine_act(x, scale, shift, code),
                ops._affine_act_backward_reduce(grad, x, scale, shift, code),
                ops._affine_act_backward(grad, x, scale, shift, scale, coef_x, coef_1, code))

    moments_cpu, out_cpu, sums_cpu, dx_cpu = run(x_cpu, grad_cpu, *coefs)
    with poisoned_allocations():
        moments_gpu, out_gpu, sums_gpu, dx_gpu = run(x_gpu, grad_gpu, *coefs_gpu)
    for gpu, cpu in zip(moments_gpu, moments_cpu):
        rows_close(gpu, cpu, 1e-10)
    close(out_gpu, out_cpu, dtype)
    # The backward reduction sums float32 terms (u = grad * act'(...), in the accumulation dtype) in float64.
    for gpu, cpu in zip(sums_gpu, sums_cpu):
        rows_close(gpu, cpu, 1e-10 if dtype == torch.float64 else 1e-5)
    close(dx_gpu, dx_cpu, dtype)
    # The outputs take x's memory format on both devices (the fake kernels' strides).
    assert out_gpu.stride() == out_cpu.stride() and dx_gpu.stride() == dx_cpu.stride()


class Gate(torch.nn.Module):
    """Squeeze-and-excitation's MLP on (N, C) channel means, as the X-ShiftNet blocks gate."""

    def __init__(self, channels, dtype):
        super().__init__()
        torch.manual_seed(7)
        self.fc1 = torch.nn.Linear(channels, 3).to(dtype)
        self.fc2 = torch.nn.Linear(3, channels).to(dtype)

    def forward(self, pooled):
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(pooled))))


def bn_affine(c, dtype):
    return (rand((c,), 5) + 0.5).to(dtype), (randn((c,), 6) * 0.2).to(dtype)


def run_batch_norm_act(x, grad, act, gated, device):
    """(output, running mean, running var, gradients of x, weight, bias and the gate's parameters) on `device`."""
    c = x.shape[1]
    weight, bias = bn_affine(c, x.dtype)
    running = [(randn((c,), 7) * 0.1).to(x.dtype).to(device), (rand((c,), 8) + 0.5).to(x.dtype).to(device)]
    leaves = [x.to(device), weight.to(device), bias.to(device)]
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    gate = Gate(c, x.dtype).to(device) if gated else None
    params = tuple(gate.parameters()) if gated else ()
    out = batch_norm_act(*leaves, *running, 0.1, 1e-5, act, gate, params)
    grads = torch.autograd.grad(out, [*leaves, *params], grad.to(device))
    return [out.detach(), *running, *grads]


@pytest.mark.parametrize("act,gated", [("relu", False), ("silu", True), ("identity", False)],
                         ids=["relu", "silu-gated", "identity"])
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_act(shape, dtype, layout, act, gated):
    x = randn(shape, 1, dtype) * 2 + 1  # a mean away from 0
    pre = torch.nn.functional.batch_norm(x.double(), None, None, *[t.double() for t in bn_affine(shape[1], dtype)],
                                         training=True)  # the ReLU's input where ungated
    grad = away_from_the_kink(randn(shape, 2, dtype), pre, act)
    (x_cpu, grad_cpu), (x_gpu, grad_gpu) = both_devices([x, grad], layout)
    expected = run_batch_norm_act(x_cpu, grad_cpu, act, gated, "cpu")
    with poisoned_allocations():
        actual = run_batch_norm_act(x_gpu, grad_gpu, act, gated, "cuda")
    assert actual[0].stride() == expected[0].stride() and actual[3].stride() == expected[3].stride()
    rtol, atol = TOLERANCES[dtype]
    names = ["out", "running mean", "running var", "dx", "d weight", "d bias"] + ["d gate"] * 4
    for name, gpu, cpu in zip(names, actual, expected):
        # Statistics and gradients of the weights are sums of many rounded terms; the gate runs torch's own
        # kernels (cuBLAS on the GPU): compared to each tensor's scale.
        err, scale = (gpu.cpu().double() - cpu.double()).abs().max().item(), cpu.double().abs().max().item()
        assert err <= 10 * rtol * scale + atol, f"{name}: max error {err:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_batch_norm_act_reductions_at_epamnet_scale(layout, dtype):
    # EPAM-Net's first RGB stage: 216 rows of 50176 elements, 2160 (contiguous) or 2008 (channels-last) blocks of
    # partial sums and a second pass. Against the CPU kernels, and bit for bit the same on a second run.
    shape = (4, 54, 16, 56, 56)
    x, grad = randn(shape, 11, dtype), randn(shape, 12, dtype)
    scale, shift, _, _ = bn_coefficients(shape, dtype, 13)
    (x_cpu, grad_cpu), (x_gpu, grad_gpu) = both_devices([x, grad], layout)
    ops = torch.ops.epamx
    runs = [(ops._channel_moments(x_gpu), ops._affine_act_backward_reduce(grad_gpu, x_gpu, scale.cuda(), shift.cuda(), 2))
            for _ in range(2)]
    for one, two in zip(runs[0], runs[1]):
        for a, b in zip(one, two):
            assert torch.equal(a, b)
    for gpu, cpu in zip(runs[0][0], ops._channel_moments(x_cpu)):
        rows_close(gpu, cpu, 1e-10)
    for gpu, cpu in zip(runs[0][1], ops._affine_act_backward_reduce(grad_cpu, x_cpu, scale, shift, 2)):
        rows_close(gpu, cpu, 1e-5)


def test_batch_norm_act_on_a_side_stream():
    shape = (2, 54, 4, 14, 14)
    x = randn(shape, 3).contiguous(memory_format=torch.channels_last_3d)
    grad = randn(shape, 4).contiguous(memory_format=torch.channels_last_3d)
    scale, shift, coef_x, coef_1 = coefs = bn_coefficients(shape, torch.float32, 5)
    ops = torch.ops.epamx
    for gpu, cpu in zip(on_busy_side_stream(ops._channel_moments, x.cuda()), ops._channel_moments(x)):
        rows_close(gpu, cpu, 1e-10)
    out = on_busy_side_stream(lambda *t: ops.affine_act(*t, 2), x.cuda(), scale.cuda(), shift.cuda())
    close(out, ops.affine_act(x, scale, shift, 2), torch.float32)
    sums = on_busy_side_stream(lambda *t: ops._affine_act_backward_reduce(*t, 2), grad.cuda(), x.cuda(),
                               scale.cuda(), shift.cuda())
    for gpu, cpu in zip(sums, ops._affine_act_backward_reduce(grad, x, scale, shift, 2)):
        rows_close(gpu, cpu, 1e-5)
    dx = on_busy_side_stream(lambda g, v, s, t, cx, c1: ops._affine_act_backward(g, v, s, t, s, cx, c1, 2),
                             grad.cuda(), x.cuda(), *[t.cuda() for t in coefs])
    close(dx, ops._affine_act_backward(grad, x, scale, shift, scale, coef_x, coef_1, 2), torch.float32)


# ---- the int32 index boundary: the largest tensors the int32 kernels take ---------------------------------------
# 2^31 - 2 = 2 * 3^2 * 7 * 11 * 31 * 151 * 331 elements: every int32 kernel below runs one thread per element (or
# per 2-byte unit) with a grid of ~134M threads, so the grid-stride loop steps past 2^31 - 1. An int32 loop counter
# wrapped there to a negative index, still below n, and the kernel read and wrote before its buffers.

BIG = 2**31 - 2
P_ODD = (151, 331)  # an odd frame plane: temporal_shift moves float16 one element per thread


def _slices_close(gpu, cpu_fn, x_gpu, dim, size, dtype, exact=False):
    """Compare the first and last `size` entries along `dim` with the CPU kernel applied to those slices alone."""
    for lo in (0, x_gpu.shape[dim] - size):
        part = x_gpu.narrow(dim, lo, size).cpu()
        close(gpu.narrow(dim, lo, size), cpu_fn(part), dtype, exact)


def _big(shape, layout, generator):
    """A float16 standard-normal tensor on the GPU, in `layout` ("contiguous" or "channels_last")."""
    x = torch.randn(shape, device="cuda", dtype=torch.float16, generator=generator)
    return x.contiguous(memory_format=torch.channels_last_3d) if layout == "channels_last" else x


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_int32_boundary_attention_reweight(layout):
    # channels_last: the forward pass steps past 2^31 - 1 in NTHWC order; the backward pass's teams (32 lanes per
    # position, 1386 channels) read up to the last element.
    shape = (1, 2 * 9 * 7 * 11, 31, *P_ODD)
    assert torch.Size(shape).numel() == BIG
    g = torch.Generator(device="cuda").manual_seed(0)
    x = _big(shape, layout, g)
    s = torch.rand(1, 1, 31, *P_ODD, device="cuda", dtype=torch.float16, generator=g)
    a = torch.rand(1, 1, 31, 1, 1, device="cuda", dtype=torch.float16, generator=g)
    out = attention_reweight(x, s, a)
    torch.cuda.synchronize()
    _slices_close(out, lambda part: attention_reweight(part, s.cpu(), a.cpu()), x, 1, 2, torch.float16)
    del out
    grad = _big(shape, layout, g)
    dx, ds, da = torch.ops.epamx._attention_reweight_backward(grad, x, s, a)
    torch.cuda.synchronize()
    # dx is elementwise per channel; dS and dA sum over all channels: against the same sums taken by torch.
    dx_cpu = torch.ops.epamx._attention_reweight_backward(grad[:, :2].cpu(), x[:, :2].cpu(), s.cpu(), a.cpu())[0]
    close(dx[:, :2], dx_cpu, torch.float16)
    gx = torch.zeros(1, 1, 31, *P_ODD, device="cuda", dtype=torch.float32)
    for c0 in range(0, shape[1], 64):
        gx += (grad[:, c0:c0 + 64].float() * x[:, c0:c0 + 64].float()).sum(1, keepdim=True)
    torch.testing.assert_close(ds.float(), a.float() * gx, rtol=1e-2, atol=1e-1)
    torch.testing.assert_close(da.float(), (gx * s.float()).sum((3, 4), keepdim=True), rtol=1e-2, atol=10.0)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_int32_boundary_channel_pool(layout):
    # channels_last: teams of 2 lanes (C = 2), ~2^31 of them in all, so the team loop's counter passes 2^31 - 1.
    shape = (1, 2, 9 * 7 * 11 * 31, *P_ODD)
    assert torch.Size(shape).numel() == BIG
    x = _big(shape, layout, torch.Generator(device="cuda").manual_seed(1))
    out = channel_pool(x, 1)
    torch.cuda.synchronize()
    _slices_close(out, lambda part: channel_pool(part, 1), x, 2, 3, torch.float16)
    grad = torch.randn_like(out)  # out's layout
    dx = torch.ops.epamx._channel_pool_backward(grad, x, 1)
    torch.cuda.synchronize()
    for lo in (0, shape[2] - 3):
        expected = torch.ops.epamx._channel_pool_backward(grad[:, :, lo:lo + 3].cpu(), x[:, :, lo:lo + 3].cpu(), 1)
        close(dx[:, :, lo:lo + 3], expected, torch.float16)


@pytest.mark.slow
def test_int32_guard_covers_the_pooled_tensor():
    # C = 1: the output (N, 2, T, H, W) has twice x's elements, beyond int32 although x is not.
    x = torch.empty(1, 1, 2**30 // 64 + 1, 8, 8, device="cuda", dtype=torch.float16).normal_()
    with pytest.raises(RuntimeError, match="indexes with int32"):
        channel_pool(x, 1)
    grad = torch.empty(1, 2, x.shape[2], 8, 8, device="cuda", dtype=torch.float16).normal_()
    with pytest.raises(RuntimeError, match="indexes with int32"):
        torch.ops.epamx._channel_pool_backward(grad, x, 1)


@pytest.mark.slow
def test_int32_boundary_temporal_shift():
    shape = (1, 2 * 9 * 7, 11 * 31, *P_ODD)
    assert torch.Size(shape).numel() == BIG
    x = torch.randn(shape, device="cuda", dtype=torch.float16, generator=torch.Generator(device="cuda").manual_seed(2))
    out = temporal_shift(x, 8)
    torch.cuda.synchronize()
    fold = shape[1] // 8
    # Channel 0 takes frame t+1, channel `fold` frame t-1, the last channel (the buffer's end) is copied.
    close(out[:, 0, :-1], x[:, 0, 1:].cpu(), torch.float16, exact=True)
    close(out[:, fold, 1:], x[:, fold, :-1].cpu(), torch.float16, exact=True)
    close(out[:, -1], x[:, -1].cpu(), torch.float16, exact=True)
    assert not out[:, 0, -1].any() and not out[:, fold, 0].any()


@pytest.mark.slow
def test_int32_boundary_batch_norm_act():
    # channels_last_3d, EPAM-Net's layout: the reductions' blocks (84 tiles of 256 of the 21483 channels per sample,
    # 13 slices of 3845 positions) read 49981 positions C apart, up to the last element; the elementwise kernels step
    # past 2^31 - 1 as the others do.
    shape = (2, 9 * 7 * 11 * 31, 1, *P_ODD)
    assert torch.Size(shape).numel() == BIG
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(shape, device="cuda", dtype=torch.float16, generator=g).contiguous(
        memory_format=torch.channels_last_3d)
    scale, shift, coef_x, coef_1 = coefs = [t.cuda() for t in bn_coefficients(shape, torch.float16, 9)]
    ops = torch.ops.epamx
    s1, s2 = ops._channel_moments(x)
    torch.cuda.synchronize()
    for c in (slice(0, 2), slice(-2, None)):
        part = x[:, c].double()
        rows_close(s1[:, c], part.sum((2, 3, 4)).cpu(), 1e-10)
        rows_close(s2[:, c], (part * part).sum((2, 3, 4)).cpu(), 1e-10)
        del part
    out = ops.affine_act(x, scale, shift, 2)
    torch.cuda.synchronize()
    for c in (slice(0, 2), slice(-2, None)):
        close(out[:, c], ops.affine_act(x[:, c].cpu(), scale[:, c].cpu(), shift[:, c].cpu(), 2), torch.float16)
    del out
    grad = torch.randn_like(x).contiguous(memory_format=torch.channels_last_3d)
    sum_u, sum_ux = ops._affine_act_backward_reduce(grad, x, scale, shift, 2)
    dx = ops._affine_act_backward(grad, x, scale, shift, scale, coef_x, coef_1, 2)
    torch.cuda.synchronize()
    for c in (slice(0, 2), slice(-2, None)):
        part = [t[:, c].cpu() for t in (grad, x)] + [t[:, c].cpu() for t in coefs]
        expected = ops._affine_act_backward_reduce(*part[:4], 2)
        rows_close(sum_u[:, c], expected[0], 1e-5)
        rows_close(sum_ux[:, c], expected[1], 1e-5)
        close(dx[:, c], ops._affine_act_backward(*part[:4], part[2], *part[4:], 2), torch.float16)


def _row_sums(a, b=None, chunk=4096):
    """Per-(n, c) float64 sums of a (times b), taken in chunks of H rows: (N, C) on the CPU."""
    total = torch.zeros(a.shape[:2], dtype=torch.float64, device=a.device)
    for h0 in range(0, a.shape[3], chunk):
        part = a[:, :, :, h0:h0 + chunk].double()
        if b is not None:
            part = part * b[:, :, :, h0:h0 + chunk].double()
        total += part.sum((2, 3, 4))
        del part
    return total.cpu()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_int64_indexing_batch_norm_act(layout):
    # Past int32: 2^31 + 7237153 elements, so the kernels index with int64 (the reductions' rows of 718M elements cut
    # into slices, the elementwise kernels' last elements beyond 2^31).
    shape = (1, 3, 1, 26800, 26800)
    assert torch.Size(shape).numel() > 2**31
    g = torch.Generator(device="cuda").manual_seed(4)
    x = _big(shape, layout, g)
    scale, shift, coef_x, coef_1 = coefs = [t.cuda() for t in bn_coefficients(shape, torch.float16, 10)]
    ops = torch.ops.epamx
    s1, s2 = ops._channel_moments(x)
    rows_close(s1, _row_sums(x), 1e-10)
    rows_close(s2, _row_sums(x, x), 1e-10)
    tail = (slice(None), slice(None), slice(None), slice(-2, None))  # the last two rows of every channel

    def cpu_part(t):
        return t[tail].cpu()

    out = ops.affine_act(x, scale, shift, 2)
    close(cpu_part(out), ops.affine_act(cpu_part(x), scale.cpu(), shift.cpu(), 2), torch.float16)
    del out
    grad = _big(shape, layout, g)
    sum_u, sum_ux = ops._affine_act_backward_reduce(grad, x, scale, shift, 0)  # identity: u is grad
    rows_close(sum_u, _row_sums(grad), 1e-10)
    rows_close(sum_ux, _row_sums(grad, x), 1e-10)
    dx = ops._affine_act_backward(grad, x, scale, shift, scale, coef_x, coef_1, 2)
    expected = ops._affine_act_backward(cpu_part(grad), cpu_part(x), *[t.cpu() for t in coefs[:2]], scale.cpu(),
                                        *[t.cpu() for t in coefs[2:]], 2)
    close(cpu_part(dx), expected, torch.float16)
