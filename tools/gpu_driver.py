"""Calls every epamx CUDA kernel (temporal_shift, attention_reweight, channel_pool, render_heatmaps and the
batch_norm_act kernels), forward and backward, in place and out of place, on small odd-sized inputs, and checks each
result against the CPU kernel: the program tools/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck,
initcheck, synccheck). Small, so that it stays quick under the sanitizers' instrumentation.

    python tools/gpu_driver.py                          # on the GPU
    python tools/gpu_driver.py --ops attention_reweight # some ops only (racecheck: the kernels with shared memory)
    python tools/gpu_driver.py --device cpu             # the same calls on the CPU (the dry run's plumbing check)

Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 under memcheck: every tensor is then its own allocation, so a read or
write past a tensor's end is outside any allocation instead of inside the caching allocator's larger block.
Every device input is a host-to-device copy of a CPU tensor already in its layout (channels-last, transposed),
or a view of one: no torch kernel writes an input, so initcheck sees each input byte written by a copy.
"""
from __future__ import annotations

import argparse
import sys

import torch

import epamx
from epamx.ops import COCO17_LIMBS, attention_reweight, channel_pool, render_heatmaps, temporal_shift, temporal_shift_
from epamx.ops.batch_norm_act import ACTIVATIONS, batch_norm_act

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _randn(*shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _rand(*shape, seed, dtype=torch.float32):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


class Driver:
    def __init__(self, device: torch.device):
        self.device = device
        self.calls = 0

    def to(self, cpu):
        """A fresh copy of cpu on the device, strides kept: for a dense cpu (contiguous, channels-last or a
        permutation of either) one host-to-device memcpy, no torch kernel."""
        sizes_by_stride = sorted(zip(cpu.stride(), cpu.shape))
        expected = 1
        for stride, size in sizes_by_stride:
            if size > 1 and stride != expected:
                raise ValueError("not dense: copy the dense tensor and take the view on the device")
            expected *= size
        return torch.empty_strided(cpu.shape, cpu.stride(), dtype=cpu.dtype, device=self.device).copy_(cpu)

    def check(self, name, actual, expected, exact=False, tolerance=None):
        self.calls += 1
        actual, expected = actual.detach().cpu(), expected.detach().cpu()
        tol = 0 if exact else tolerance if tolerance is not None else TOLERANCE[expected.dtype]
        try:
            torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, equal_nan=True)
        except AssertionError as exc:
            raise AssertionError(f"{name} on {self.device}: differs from the CPU kernel\n{exc}") from None

    def temporal_shift(self, dtype):
        # Frame planes of 1, 3 (odd) and 8 elements: the kernels' 1- to 16-byte units; NCTHW, (NT)CHW, channels-last.
        for n, c, t, h, w, fold_div in [(2, 9, 5, 1, 3, 4), (1, 17, 3, 2, 4, 8), (2, 16, 4, 3, 3, 8)]:
            x = _randn(n, c, t, h, w, seed=c, dtype=dtype)
            for layout, view in [("NCTHW", lambda v: v),
                                 ("channels-last", lambda v: v.contiguous(memory_format=torch.channels_last_3d)),
                                 ("strided", lambda v: v.transpose(3, 4))]:
                cpu = view(x)
                dev = self.to(cpu)
                name = f"temporal_shift {tuple(cpu.shape)} {layout} {dtype}"
                self.check(name, temporal_shift(dev, fold_div), temporal_shift(cpu, fold_div), exact=True)
                back = torch.ops.epamx._temporal_shift_backward
                self.check(name + " backward", back(dev, fold_div, None), back(cpu, fold_div, None), exact=True)
                y_cpu, y_dev = cpu.clone(), self.to(cpu)
                temporal_shift_(y_cpu, fold_div)
                temporal_shift_(y_dev, fold_div)
                self.check(name + " in place", y_dev, y_cpu, exact=True)
                torch.ops.epamx._temporal_shift_backward_(y_cpu, fold_div, None)
                torch.ops.epamx._temporal_shift_backward_(y_dev, fold_div, None)
                self.check(name + " backward in place", y_dev, y_cpu, exact=True)
            tsm = x.transpose(1, 2).reshape(n * t, c, h, w)
            self.check(f"temporal_shift (NT)CHW {dtype}", temporal_shift(self.to(tsm), fold_div, t),
                       temporal_shift(tsm, fold_div, t), exact=True)
        # Autograd through the public ops, out of place and in place.
        x = _randn(2, 8, 3, 3, 5, seed=3, dtype=dtype)
        for inplace in (False, True):
            grads = []
            for on_device in (False, True):
                leaf = (self.to(x) if on_device else x.clone()).requires_grad_(True)
                y = leaf * 2
                out = temporal_shift_(y, 4) if inplace else temporal_shift(y, 4)
                out.backward(torch.ones_like(out))
                grads.append(leaf.grad)
            self.check(f"temporal_shift autograd inplace={inplace} {dtype}", grads[1], grads[0], exact=True)

    def attention_reweight(self, dtype):
        # NCTHW: one channel group (C small, many positions) and several (the GPU splits channels into groups).
        # channels_last_3d: a team of lanes per position, from 1 lane (C = 1) to 32 (C = 17: 15 idle; C = 40: 8 lanes
        # with two channels).
        for shape in [(2, 17, 3, 5, 3), (1, 3, 2, 61, 67), (3, 1, 5, 2, 4), (1, 40, 2, 3, 5)]:
            n, c, t, h, w = shape
            for layout, fmt in [("NCTHW", torch.contiguous_format), ("channels-last", torch.channels_last_3d)]:
                cpu = [_randn(*shape, seed=1, dtype=dtype).contiguous(memory_format=fmt),
                       _rand(n, 1, t, h, w, seed=2, dtype=dtype), _rand(n, 1, t, 1, 1, seed=3, dtype=dtype)]
                dev = [self.to(v) for v in cpu]
                grad = _randn(*shape, seed=4, dtype=dtype).contiguous(memory_format=fmt)
                name = f"attention_reweight {shape} {layout} {dtype}"
                self.check(name, attention_reweight(*dev), attention_reweight(*cpu))
                expected = torch.ops.epamx._attention_reweight_backward(grad, *cpu)
                actual = torch.ops.epamx._attention_reweight_backward(self.to(grad), *dev)
                for what, a, e in zip(("dx", "dS", "dA"), actual, expected):
                    scale = max(1.0, e.abs().max().item())
                    self.check(f"{name} backward {what}", a / scale, e / scale)

    def channel_pool(self, dtype):
        # In both memory formats: channels-last gives each position a team of lanes (1 to 32 here).
        for shape, t_stride in [((2, 9, 5, 2, 4), 2), ((3, 1, 4, 3, 3), 1), ((1, 17, 7, 5, 3), 3), ((1, 5, 3, 1, 1), 2**32),
                                ((1, 40, 4, 3, 5), 2)]:
            for layout, fmt in [("NCTHW", torch.contiguous_format), ("channels-last", torch.channels_last_3d)]:
                x = _randn(*shape, seed=5, dtype=dtype).contiguous(memory_format=fmt)
                name = f"channel_pool {shape} t_stride={t_stride} {layout} {dtype}"
                out = channel_pool(x, t_stride)
                self.check(name, channel_pool(self.to(x), t_stride), out)
                grad = _randn(*out.shape, seed=6, dtype=dtype).contiguous(memory_format=fmt)
                back = torch.ops.epamx._channel_pool_backward
                self.check(name + " backward", back(self.to(grad), self.to(x), t_stride),
                           back(grad, x, t_stride))

    def render_heatmaps(self, dtype):
        g = torch.Generator().manual_seed(7)
        kp = torch.rand(2, 2, 3, 17, 2, generator=g) * torch.tensor([33.0, 25.0]) - 2
        scores = torch.rand(2, 2, 3, 17, generator=g)
        kp[0, 0, 0, 3] = float("nan")
        for limbs in (None, COCO17_LIMBS):
            name = f"render_heatmaps limbs={limbs is not None} {dtype}"
            expected = render_heatmaps(kp, scores, (23, 31), 0.6, limbs, dtype=dtype)
            actual = render_heatmaps(self.to(kp), self.to(scores), (23, 31), 0.6, limbs, dtype=dtype)
            self.check(name, actual, expected)
        self.check(f"render_heatmaps no scores {dtype}", render_heatmaps(self.to(kp), None, 16, dtype=dtype),
                   render_heatmaps(kp, None, 16, dtype=dtype))

    def batch_norm_act(self, dtype):
        # The four kernels (_channel_moments, affine_act, _affine_act_backward_reduce, _affine_act_backward), each
        # activation, odd shapes in the three layouts the kernels tell apart, then batch_norm_act with a gate through
        # autograd. The reductions' launch plans (batch_norm_act.h, row_reduce_plan): (2, 5, 3, 7, 9) one row a
        # block; (3, 17, 2, 1, 1) 2-element rows, many a block; (1, 3, 2, 61, 67) rows cut into 2 (contiguous) or 6
        # (channels-last) slices, added by a second pass; (2, 300, 1, 2, 3) two channel tiles of 150 per sample.
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        # The backward reduction sums float32 terms (u = grad * act'(...)) in float64: a few float32 ulp apart.
        sum_tol = 1e-10 if dtype == torch.float64 else 1e-5
        layouts = [("contiguous", lambda v: v),
                   ("channels_last_3d", lambda v: v.contiguous(memory_format=torch.channels_last_3d)),
                   ("transposed", lambda v: v.transpose(3, 4).contiguous().transpose(3, 4))]
        for shape in [(2, 5, 3, 7, 9), (3, 17, 2, 1, 1), (1, 3, 2, 61, 67), (2, 300, 1, 2, 3)]:
            n, c = shape[:2]
            scale = ((_rand(n, c, seed=11) + 0.5) * torch.where(_rand(n, c, seed=12) < 0.2, -1, 1)).to(acc)
            shift = (_randn(n, c, seed=13) * 0.3).to(acc)
            coef_x, coef_1 = (_randn(n, c, seed=14) * 0.1).to(acc), (_randn(n, c, seed=15) * 0.1).to(acc)
            coefs = [scale, shift, coef_x, coef_1]
            dev_coefs = [self.to(v) for v in coefs]
            for layout, view in layouts:
                x, grad = view(_randn(*shape, seed=9, dtype=dtype)), view(_randn(*shape, seed=10, dtype=dtype))
                x_dev, grad_dev = self.to(x), self.to(grad)
                name = f"batch_norm_act {shape} {layout} {dtype}"
                moments = torch.ops.epamx._channel_moments
                for what, a, e in zip(("sum", "sum of squares"), moments(x_dev), moments(x)):
                    self.check_sums(f"{name} _channel_moments {what}", a, e, 1e-10)
                for act, code in ACTIVATIONS.items():
                    self.check(f"{name} affine_act {act}", torch.ops.epamx.affine_act(x_dev, *dev_coefs[:2], code),
                               torch.ops.epamx.affine_act(x, *coefs[:2], code))
                    reduce = torch.ops.epamx._affine_act_backward_reduce
                    for what, a, e in zip(("sum_u", "sum_ux"), reduce(grad_dev, x_dev, *dev_coefs[:2], code),
                                          reduce(grad, x, *coefs[:2], code)):
                        self.check_sums(f"{name} _affine_act_backward_reduce {act} {what}", a, e, sum_tol)
                    back = torch.ops.epamx._affine_act_backward
                    self.check(f"{name} _affine_act_backward {act}",
                               back(grad_dev, x_dev, *dev_coefs[:2], dev_coefs[0], *dev_coefs[2:], code),
                               back(grad, x, *coefs[:2], coefs[0], *coefs[2:], code))
        self.batch_norm_act_autograd(dtype)

    def batch_norm_act_autograd(self, dtype):
        shape = (2, 6, 3, 5, 7)
        x = _randn(*shape, seed=16, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
        grad = _randn(*shape, seed=17, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
        params = [_rand(6, seed=18) + 0.5, _randn(6, seed=19), _randn(6, 6, seed=20) * 0.3]
        results = []
        for on_device in (False, True):
            put = self.to if on_device else torch.clone
            weight, bias, gate_w = [put(p).requires_grad_(True) for p in params]
            running = [put(torch.zeros(6)), put(torch.ones(6))]
            leaf = put(x).requires_grad_(True)
            out = batch_norm_act(leaf, weight, bias, *running, activation="silu",
                                 gate=lambda pooled, w=gate_w: torch.sigmoid(pooled @ w.to(pooled.dtype)),
                                 gate_params=[gate_w])
            out.backward(put(grad))
            results.append([out, leaf.grad, weight.grad, bias.grad, gate_w.grad, *running])
        for what, a, e in zip(("out", "dx", "d weight", "d bias", "d gate", "running mean", "running var"),
                              results[1], results[0]):
            # The low-precision rows come from reductions over a rounded activation: relative to their size.
            scale = max(1.0, e.abs().max().item())
            self.check(f"batch_norm_act autograd {what} {dtype}", a / scale, e / scale)

    def check_sums(self, name, actual, expected, tolerance):
        """Per-row float64 sums: the same terms, summed in another order; relative to the largest."""
        scale = max(1.0, expected.abs().max().item())
        self.check(name, actual / scale, expected / scale, tolerance=tolerance)


OPS = ("temporal_shift", "attention_reweight", "channel_pool", "render_heatmaps", "batch_norm_act")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--dtypes", default="all", help="'all' or a comma list such as float32,bfloat16")
    parser.add_argument("--ops", default="all", help=f"'all' or a comma list of {', '.join(OPS)}")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_driver: no CUDA device", file=sys.stderr)
            return 2
        if not epamx.build_info()["cuda"]:
            print("gpu_driver: epamx was built without its CUDA kernels", file=sys.stderr)
            return 2
    dtypes = DTYPES if args.dtypes == "all" else [getattr(torch, d) for d in args.dtypes.split(",")]
    ops = OPS if args.ops == "all" else args.ops.split(",")
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {', '.join(OPS)}")
    driver = Driver(device)
    for dtype in dtypes:
        for op in ops:
            getattr(driver, op)(dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"gpu_driver: {driver.calls} kernel results ({', '.join(ops)}) on {device} match the CPU kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
