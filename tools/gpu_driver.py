"""Calls every epamx CUDA kernel, forward and backward, in place and out of place, on small odd-sized inputs, and
checks each result against the CPU kernel: the program tools/gpu_check.sh runs under compute-sanitizer (memcheck,
racecheck, initcheck, synccheck). Small, so that it stays quick under the sanitizers' instrumentation.

    python tools/gpu_driver.py                  # on the GPU
    python tools/gpu_driver.py --device cpu     # the same calls on the CPU (the dry run's plumbing check)

Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 under memcheck: every tensor is then its own allocation, so a read or
write past a tensor's end is outside any allocation instead of inside the caching allocator's larger block.
"""
from __future__ import annotations

import argparse
import sys

import torch

import epamx
from epamx.ops import COCO17_LIMBS, attention_reweight, channel_pool, render_heatmaps, temporal_shift, temporal_shift_

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

    def check(self, name, actual, expected, exact=False):
        self.calls += 1
        actual = actual.detach().cpu()
        tol = 0 if exact else TOLERANCE[expected.dtype]
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
                cpu, dev = view(x), view(x.to(self.device))
                name = f"temporal_shift {tuple(cpu.shape)} {layout} {dtype}"
                self.check(name, temporal_shift(dev, fold_div), temporal_shift(cpu, fold_div), exact=True)
                back = torch.ops.epamx._temporal_shift_backward
                self.check(name + " backward", back(dev, fold_div, None), back(cpu, fold_div, None), exact=True)
                y_cpu, y_dev = cpu.clone(), dev.clone()
                temporal_shift_(y_cpu, fold_div)
                temporal_shift_(y_dev, fold_div)
                self.check(name + " in place", y_dev, y_cpu, exact=True)
                torch.ops.epamx._temporal_shift_backward_(y_cpu, fold_div, None)
                torch.ops.epamx._temporal_shift_backward_(y_dev, fold_div, None)
                self.check(name + " backward in place", y_dev, y_cpu, exact=True)
            tsm = x.transpose(1, 2).reshape(n * t, c, h, w)
            self.check(f"temporal_shift (NT)CHW {dtype}", temporal_shift(tsm.to(self.device), fold_div, t),
                       temporal_shift(tsm, fold_div, t), exact=True)
        # Autograd through the public ops, out of place and in place.
        x = _randn(2, 8, 3, 3, 5, seed=3, dtype=dtype)
        for inplace in (False, True):
            grads = []
            for device in ("cpu", self.device):
                leaf = x.to(device).requires_grad_(True)
                y = leaf * 2
                out = temporal_shift_(y, 4) if inplace else temporal_shift(y, 4)
                out.backward(torch.ones_like(out))
                grads.append(leaf.grad)
            self.check(f"temporal_shift autograd inplace={inplace} {dtype}", grads[1], grads[0], exact=True)

    def attention_reweight(self, dtype):
        # One channel group (C small, many positions) and several (the GPU splits channels into groups).
        for shape in [(2, 17, 3, 5, 3), (1, 3, 2, 61, 67), (3, 1, 5, 2, 4)]:
            n, c, t, h, w = shape
            cpu = [_randn(*shape, seed=1, dtype=dtype), _rand(n, 1, t, h, w, seed=2, dtype=dtype),
                   _rand(n, 1, t, 1, 1, seed=3, dtype=dtype)]
            dev = [v.to(self.device) for v in cpu]
            grad = _randn(*shape, seed=4, dtype=dtype)
            name = f"attention_reweight {shape} {dtype}"
            self.check(name, attention_reweight(*dev), attention_reweight(*cpu))
            expected = torch.ops.epamx._attention_reweight_backward(grad, *cpu)
            actual = torch.ops.epamx._attention_reweight_backward(grad.to(self.device), *dev)
            for what, a, e in zip(("dx", "dS", "dA"), actual, expected):
                scale = max(1.0, e.abs().max().item())
                self.check(f"{name} backward {what}", a / scale, e / scale)

    def channel_pool(self, dtype):
        for shape, t_stride in [((2, 9, 5, 2, 4), 2), ((3, 1, 4, 3, 3), 1), ((1, 17, 7, 5, 3), 3), ((1, 5, 3, 1, 1), 2**32)]:
            x = _randn(*shape, seed=5, dtype=dtype)
            name = f"channel_pool {shape} t_stride={t_stride} {dtype}"
            out = channel_pool(x, t_stride)
            self.check(name, channel_pool(x.to(self.device), t_stride), out)
            grad = _randn(*out.shape, seed=6, dtype=dtype)
            back = torch.ops.epamx._channel_pool_backward
            self.check(name + " backward", back(grad.to(self.device), x.to(self.device), t_stride),
                       back(grad, x, t_stride))

    def render_heatmaps(self, dtype):
        g = torch.Generator().manual_seed(7)
        kp = torch.rand(2, 2, 3, 17, 2, generator=g) * torch.tensor([33.0, 25.0]) - 2
        scores = torch.rand(2, 2, 3, 17, generator=g)
        kp[0, 0, 0, 3] = float("nan")
        for limbs in (None, COCO17_LIMBS):
            name = f"render_heatmaps limbs={limbs is not None} {dtype}"
            expected = render_heatmaps(kp, scores, (23, 31), 0.6, limbs, dtype=dtype)
            actual = render_heatmaps(kp.to(self.device), scores.to(self.device), (23, 31), 0.6, limbs, dtype=dtype)
            self.check(name, actual, expected)
        self.check(f"render_heatmaps no scores {dtype}", render_heatmaps(kp.to(self.device), None, 16, dtype=dtype),
                   render_heatmaps(kp, None, 16, dtype=dtype))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--dtypes", default="all", help="'all' or a comma list such as float32,bfloat16")
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
    driver = Driver(device)
    for dtype in dtypes:
        for op in (driver.temporal_shift, driver.attention_reweight, driver.channel_pool, driver.render_heatmaps):
            op(dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"gpu_driver: {driver.calls} kernel results on {device} match the CPU kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
