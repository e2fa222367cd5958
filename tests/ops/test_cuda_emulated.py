"""The CUDA kernels, run by the CUDA emulator (tools/cuda_emu) on the CPU, against epamx's CPU kernels: every kernel of
csrc/*/*_cuda.cu with its launch code, on odd sizes, every float dtype and the memory layouts the GPU tests use. No GPU
needed: this is the rehearsal that runs everywhere; tests/ops/test_cuda_vs_cpu.py is the proof on a GPU.

The emulator runs every CUDA thread of a block (fibers, barriers and warp shuffles as on a GPU) and stops a launch
whose barrier or full-warp shuffle not every thread reaches. Each case runs under three schedules (SCHEDULES) and
must give the same bits under each, so a result that depends on the order threads run in (a missing barrier, two
threads writing one element) fails. The grid is capped at 3 blocks (emulator.MAX_BLOCKS), so the grid-stride loops
run past their first round. Outputs and scratch buffers start NaN-filled, and each block's shared memory too, so a
value no thread wrote shows. CI runs this module a second time with the kernels built with AddressSanitizer
(under the first schedule alone)."""
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epamx.ops import COCO17_LIMBS
from epamx.ops.batch_norm_act import ACTIVATIONS
from test_cuda_vs_cpu import (
    BN_SHAPES,
    DTYPE_IDS,
    NATIVE_LAYOUTS,
    POOL_CASES,
    REWEIGHT_SHAPES,
    SHIFT_SHAPES,
    away_from_the_kink,
    bn_coefficients,
    close as close_to_cpu,
    keypoints,
    lay_out,
    rand,
    randn,
    reweight_inputs,
    rows_close,
)
from testkit import FLOAT_DTYPES, TOLERANCES, poisoned_allocations, raises_naming

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "cuda_emu"))
import emulator as cuda_emu  # noqa: E402

# Warps in step, thread by thread; one warp at a time, last first, each as far ahead as it can get; random orders.
# Built with AddressSanitizer (CI's second pass) the first alone: that pass checks the addresses each thread reads
# and writes, which come from its indices and the inputs whatever the order threads run in, and the plain pass has
# checked the orders (a third of the time: 21 min for the three on a 2-core Zen 3).
ALL_SCHEDULES = ["lockstep", "warps-reverse", "shuffled:7"]
SCHEDULES = ALL_SCHEDULES[:1] if os.environ.get("EPAMX_CUDA_EMU_SANITIZE") else ALL_SCHEDULES
CPU = torch.ops.epamx
SHIFT_LAYOUTS = ["contiguous", "strided", "channels_last"]
# Every float dtype with int32 offsets, and float32 with int64 offsets (EPAMX_CUDA_EMU_INDEX=int64), for the kernels
# that take int64 offsets for tensors past int32's reach.
DTYPE_INDEX = [(d, "int32") for d in FLOAT_DTYPES] + [(torch.float32, "int64")]
DTYPE_INDEX_IDS = DTYPE_IDS + ["float32-int64"]
BN_LAYOUTS = SHIFT_LAYOUTS + ["transposed"]


@pytest.fixture(scope="module")
def emu():
    return cuda_emu.load()


@contextlib.contextmanager
def emulator_settings(**settings):
    """EPAMX_CUDA_EMU_<NAME>=value for each name=value inside (the emulator reads them at each launch)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in settings.items():
            patch.setenv(f"EPAMX_CUDA_EMU_{name.upper()}", value)
        yield


def emulated(fn, index="int32", schedules=None):
    """fn() (which calls epamx_emu ops, on inputs of its own) under each of ``schedules`` (default SCHEDULES), with
    NaN-filled allocations, and int64 offsets wherever a kernel can take them if index is "int64": the first run's
    result, after checking that every run gave the same bits."""
    schedules = SCHEDULES if schedules is None else schedules
    runs = []
    for schedule in schedules:
        with emulator_settings(schedule=schedule, index=index), poisoned_allocations():
            runs.append(fn())
    first = _flat(runs[0])
    for schedule, run in zip(schedules[1:], runs[1:]):
        for a, b in zip(first, _flat(run), strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, check_stride=True,
                                       msg=f"schedule {schedule} gave other bits than {schedules[0]}")
    return runs[0]


def _flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for r in result for t in _flat(r)]


def close(emu_out, cpu_out, dtype, exact=False):
    close_to_cpu(emu_out, cpu_out, dtype, exact)  # the GPU tests' comparison
    assert emu_out.stride() == cpu_out.stride()  # the same memory format as the CPU kernel's output


def sums_close(emu_out, cpu_out, dtype):
    """Sums over channels or pixels, taken in another order: relative to their size."""
    scale = cpu_out.abs().max().clamp_min(1).item()
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(emu_out.double(), cpu_out.double(), rtol=rtol, atol=atol * scale)


# ---- temporal_shift ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", SHIFT_LAYOUTS)
@pytest.mark.parametrize("dtype,index", DTYPE_INDEX, ids=DTYPE_INDEX_IDS)
@pytest.mark.parametrize("shape", SHIFT_SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"-fd{s[5]}")
def test_temporal_shift(emu, shape, dtype, index, layout):
    *size, fold_div = shape
    x = lay_out(randn(size, 1, dtype), layout)

    def run():
        inplace, back_inplace = x.clone(), x.clone()
        emu.temporal_shift_(inplace, fold_div, None)
        emu._temporal_shift_backward_(back_inplace, fold_div, None)
        return (emu.temporal_shift(x, fold_div, None), emu._temporal_shift_backward(x, fold_div, None), inplace,
                back_inplace)

    out, back, inplace, back_inplace = emulated(run, index)
    close(out, CPU.temporal_shift(x, fold_div, None), dtype, exact=True)
    close(back, CPU._temporal_shift_backward(x, fold_div, None), dtype, exact=True)
    expected = x.clone()
    CPU.temporal_shift_(expected, fold_div, None)
    close(inplace, expected, dtype, exact=True)
    expected = x.clone()
    CPU._temporal_shift_backward_(expected, fold_div, None)
    close(back_inplace, expected, dtype, exact=True)


@pytest.mark.parametrize("dtype,index", [(torch.float32, "int32"), (torch.float16, "int32"), (torch.float16, "int64")],
                         ids=["float32", "float16", "float16-int64"])
def test_temporal_shift_tsm_layout(emu, dtype, index):
    # (N * T, C, H, W) with num_segments: as allocated, channels-last (pixels with one other stride, shifted in
    # place element by element) and H/W transposed (two strides: shifted in a dense copy written back).
    x = randn((3 * 5, 19, 3, 5), 3, dtype)
    for x in [x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3)]:
        def run():
            y = x.clone()
            emu.temporal_shift_(y, 4, 5)
            return emu.temporal_shift(x, 4, 5), y
        out, inplace = emulated(run, index)
        close(out, CPU.temporal_shift(x, 4, 5), dtype, exact=True)
        expected = x.clone()
        CPU.temporal_shift_(expected, 4, 5)
        close(inplace, expected, dtype, exact=True)


# ---- attention_reweight ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", NATIVE_LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", REWEIGHT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_reweight(emu, shape, dtype, layout):
    x, s, a = reweight_inputs(shape, dtype)
    x = lay_out(x, layout)
    grad = lay_out(randn(shape, 7, dtype), layout)
    out, grads = emulated(lambda: (emu.attention_reweight(x, s, a), emu._attention_reweight_backward(grad, x, s, a)))
    close(out, CPU.attention_reweight(x, s, a), dtype)
    dx, ds, da = CPU._attention_reweight_backward(grad, x, s, a)
    close(grads[0], dx, dtype)
    sums_close(grads[1], ds, dtype)
    sums_close(grads[2], da, dtype)


# ---- channel_pool ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", NATIVE_LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-s{c[1]}")
def test_channel_pool(emu, case, dtype, layout):
    shape, t_stride = case
    x = lay_out(randn(shape, 3, dtype), layout)
    expected = CPU.channel_pool(x, t_stride)
    grad = lay_out(randn(expected.shape, 4, dtype), layout)
    out, dx = emulated(lambda: (emu.channel_pool(x, t_stride), emu._channel_pool_backward(grad, x, t_stride)))
    close(out[:, 0], expected[:, 0], dtype, exact=True)  # the maximum is exact
    close(out[:, 1], expected[:, 1], dtype)
    close(dx, CPU._channel_pool_backward(grad, x, t_stride), dtype)


@pytest.mark.parametrize("channels", [6, 45], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_channel_pool_ties_and_nan(emu, layout, channels):
    # The first channel holding the maximum takes its gradient, whichever lane of a team holds it; NaN wins.
    x = torch.randint(0, 3, (2, channels, 4, 3, 3), generator=torch.Generator().manual_seed(1)).float()
    x[0, 2, 0, 1, 1] = float("nan")
    x[1, -1, 2, 0, 2] = x[1, 1, 2, 0, 2] = float("nan")
    x = lay_out(x, layout)
    grad = lay_out(randn((2, 2, 2, 3, 3), 2), layout)
    out, dx = emulated(lambda: (emu.channel_pool(x, 2), emu._channel_pool_backward(grad, x, 2)))
    close(out, CPU.channel_pool(x, 2), torch.float32, exact=True)
    close(dx, CPU._channel_pool_backward(grad, x, 2), torch.float32, exact=True)


# ---- render_heatmaps ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,index", DTYPE_INDEX, ids=DTYPE_INDEX_IDS)
@pytest.mark.parametrize("limbs", [None, COCO17_LIMBS], ids=["joints", "limbs"])
@pytest.mark.parametrize("size", [(56, 56), (23, 31), (1, 7)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_render_heatmaps(emu, size, limbs, dtype, index):
    kp, scores = keypoints(2, 2, 3, 17, size, seed=8)
    if dtype == torch.float32:  # persons and frames transposed in memory
        kp, scores = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (kp, scores)]
    limbs = [j for limb in limbs for j in limb] if limbs else None
    args = (list(size), 0.6, limbs, True, 1e-3, dtype)
    out = emulated(lambda: emu.render_heatmaps(kp, scores, *args), index)
    close(out, CPU.render_heatmaps(kp, scores, *args), dtype)


# ---- batch_norm_act ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("layout", BN_LAYOUTS)
@pytest.mark.parametrize("dtype,index", DTYPE_INDEX, ids=DTYPE_INDEX_IDS)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_act_kernels(emu, shape, dtype, index, layout, act):
    # The row reductions' plans (several rows a block; rows cut into slices and a second pass; channel tiles),
    # the affine activation and its backward pass.
    code = ACTIVATIONS[act]
    scale, shift, coef_x, coef_1 = bn_coefficients(shape, dtype, 3)
    view = (*shape[:2], 1, 1, 1)
    x = randn(shape, 1, dtype)
    grad = away_from_the_kink(randn(shape, 2, dtype), x.double() * scale.view(view) + shift.view(view), act)
    x, grad = lay_out(x, layout), lay_out(grad, layout)

    def run(ops):
        return (ops._channel_moments(x), ops.affine_act(x, scale, shift, code),
                ops._affine_act_backward_reduce(grad, x, scale, shift, code),
                ops._affine_act_backward(grad, x, scale, shift, scale, coef_x, coef_1, code))

    moments, out, sums, dx = emulated(lambda: run(emu), index)
    moments_cpu, out_cpu, sums_cpu, dx_cpu = run(CPU)
    for a, b in zip(moments, moments_cpu, strict=True):
        rows_close(a, b, 1e-10)
    close(out, out_cpu, dtype)
    for a, b in zip(sums, sums_cpu, strict=True):
        rows_close(a, b, 1e-10 if dtype == torch.float64 else 1e-5)
    close(dx, dx_cpu, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_act_reductions_at_epamnet_scale(emu, layout):
    # EPAM-Net's first RGB stage, (4, 54, 16, 56, 56): 216 rows of 50176, cut into 2160 (contiguous) or 2008
    # (channels-last) slices whose partial sums a second pass adds, as the GPU runs them.
    shape = (4, 54, 16, 56, 56)
    x, grad = lay_out(randn(shape, 11), layout), lay_out(randn(shape, 12), layout)
    scale, shift, _, _ = bn_coefficients(shape, torch.float32, 13)
    moments, sums = emulated(lambda: (emu._channel_moments(x),
                                      emu._affine_act_backward_reduce(grad, x, scale, shift, 2)))
    for a, b in zip(moments, CPU._channel_moments(x), strict=True):
        rows_close(a, b, 1e-10)
    for a, b in zip(sums, CPU._affine_act_backward_reduce(grad, x, scale, shift, 2), strict=True):
        rows_close(a, b, 1e-5)


# ---- coverage, and the emulator's own checks ---------------------------------------------------------------------

def test_every_kernel_runs(emu):
    # One small call of every emulated operator in both memory formats: every __global__ function of csrc/ ran.
    for layout in ["contiguous", "channels_last"]:
        x = lay_out(randn((2, 40, 4, 3, 5), 1), layout)
        s, a = rand((2, 1, 4, 3, 5), 2), rand((2, 1, 4, 1, 1), 3)
        n_c = rand((2, 40), 4)
        y = x.clone()
        emu.temporal_shift(x, 8, None), emu.temporal_shift_(y, 8, None)
        emu.attention_reweight(x, s, a), emu._attention_reweight_backward(x, x, s, a)
        emu.channel_pool(x, 2), emu._channel_pool_backward(lay_out(randn((2, 2, 2, 3, 5), 5), layout), x, 2)
        emu._channel_moments(x), emu.affine_act(x, n_c, n_c, 1), emu._affine_act_backward_reduce(x, x, n_c, n_c, 1)
        emu._affine_act_backward(x, x, n_c, n_c, n_c, n_c, n_c, 1)
    emu.render_heatmaps(rand((1, 1, 2, 17, 2), 6) * 8, None, [8, 8], 0.6, None, True, 1e-3, None)
    run = {name.split("/")[0] for name in emu._kernels_run()}
    missing = set(cuda_emu.kernel_names()) - run
    assert not missing, f"kernels never run: {sorted(missing)}"
    assert len(cuda_emu.kernel_names()) >= 14


def test_every_kernel_that_can_runs_with_int64_offsets(emu):
    # EPAMX_CUDA_EMU_INDEX=int64 makes temporal_shift, batch_norm_act and render_heatmaps pick their int64 kernels.
    x, n_c = randn((2, 40, 4, 3, 5), 1), rand((2, 40), 4)
    with emulator_settings(index="int64"):
        emu.temporal_shift(x, 8, None), emu.temporal_shift_(x.clone(), 8, None)
        emu._channel_moments(x), emu.affine_act(x, n_c, n_c, 1), emu._affine_act_backward_reduce(x, x, n_c, n_c, 1)
        emu._affine_act_backward(x, x, n_c, n_c, n_c, n_c, n_c, 1)
        emu.render_heatmaps(rand((1, 1, 2, 17, 2), 6) * 8, None, [8, 8], 0.6, None, True, 1e-3, None)
    wide = cuda_emu.kernel_names(wide_index=True)
    missing = {f"{name}/int64" for name in wide} - set(emu._kernels_run())
    assert not missing and len(wide) >= 6, f"never run with int64 offsets: {sorted(missing)}"


def test_emulator_catches_a_race(emu):
    x = randn((5 * 64,), 1)
    expected = x.view(5, 64).double().sum(1).float()
    torch.testing.assert_close(emulated(lambda: emu._selftest("tree_sum", x, 1)), expected)
    # Without the barriers between the tree's levels the sum depends on which thread runs first.
    with pytest.raises(AssertionError, match="other bits"):
        emulated(lambda: emu._selftest("tree_sum", x, 0), schedules=ALL_SCHEDULES)


def test_emulator_starts_each_block_with_shared_memory_unwritten(emu):
    # The last thread stores nothing: each block's sum reads a slot no thread of that block wrote, NaN in every
    # block (not block 0's value left over, nor zero).
    assert emulated(lambda: emu._selftest("tree_sum", randn((5 * 64,), 1), 2)).isnan().all()


def test_emulator_catches_a_lane_missing_from_a_shuffle(emu):
    x = randn((2 * 64,), 2)
    expected = x.view(4, 32).sum(1, keepdim=True).expand(4, 32).reshape(-1)
    torch.testing.assert_close(emulated(lambda: emu._selftest("warp_sum", x, -1)), expected)
    with raises_naming(RuntimeError, "selftest.cu", "block (0, 0, 0)", "warp 0: 31 of 32 lanes wait at a shuffle"):
        emu._selftest("warp_sum", x, 5)
    with raises_naming(RuntimeError, "thread (32, 0, 0)", "__shfl_xor_sync in a partial warp"):
        emu._selftest("warp_sum", x, 48)


def test_emulator_catches_a_divergent_barrier(emu):
    x = randn((64,), 3)
    assert torch.equal(emulated(lambda: emu._selftest("divergent_sync", x, 64)), torch.ones(64))
    with raises_naming(RuntimeError, "16 of 64 threads wait at __syncthreads()", "48 have returned"):
        emu._selftest("divergent_sync", x, 16)


def test_emulator_reports_a_failed_kernel_assert(emu):
    x = randn((3 * 64,), 4)
    assert torch.equal(emu._selftest("assert", x, 99), torch.ones(3 * 64))
    with raises_naming(RuntimeError, "block (1, 0, 0)", "thread (17, 0, 0)", "CUDA_KERNEL_ASSERT"):
        emu._selftest("assert", x, 17)
    # A launch a GPU would refuse, or an unknown schedule, is an error too; the emulator works on afterwards.
    with raises_naming(RuntimeError, "EPAMX_CUDA_EMU_SCHEDULE", "sideways"), emulator_settings(schedule="sideways"):
        emu._selftest("assert", x, 99)
    with raises_naming(RuntimeError, "EPAMX_CUDA_EMU_INDEX", "int16"), emulator_settings(index="int16"):
        emu.temporal_shift(x.view(1, 3, 4, 4, 4), 2, None)
    assert torch.equal(emu._selftest("assert", x, 99), torch.ones(3 * 64))


def test_emulator_under_address_sanitizer_catches_a_read_past_a_tensor():
    # In a Python of its own, started with ASan's runtime: in bounds the kernel runs; one element past x's end, ASan
    # stops the process naming the kernel (the whole module runs this way in CI: .ci/run).
    env = cuda_emu.asan_environment()
    if env is None:
        pytest.skip("needs gcc's AddressSanitizer runtime (libasan)")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import torch, emulator; emu = emulator.load(); "
            "out = emu._selftest('shifted_read', torch.arange(128.0), int(sys.argv[2])); print('sum', int(out.sum()))")
    runs = [subprocess.run([sys.executable, "-c", code, str(cuda_emu.HERE), offset], env=env, capture_output=True,
                           text=True, timeout=900) for offset in ("0", "1")]
    assert runs[0].returncode == 0 and "sum 8128" in runs[0].stdout, runs[0].stderr[-3000:]
    assert runs[1].returncode != 0, runs[1].stdout
    assert "heap-buffer-overflow" in runs[1].stderr and "shifted_read_kernel" in runs[1].stderr, runs[1].stderr[-3000:]
