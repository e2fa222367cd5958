"""EPAM-Net on the GPU: inference and training steps, fused ops against the plain-PyTorch reference path, float32
and bfloat16 autocast; clips/s and peak GPU memory, written as a markdown table. Part of tools/gpu_check.sh.

    python tools/gpu_model.py --out model.md                       # EPAM-Net's shapes (16 x 224^2 RGB, 48 x 56^2 pose)
    python tools/gpu_model.py --device cpu --small --precisions fp32 --ops fused --iters 1   # the dry run's
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from epamx.models import EPAMNet


def _clip(batch, small, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    rgb, pose = ((4, 64), (12, 16)) if small else ((16, 224), (48, 56))
    imgs = torch.randn(batch, 3, rgb[0], rgb[1], rgb[1], generator=g).to(device)
    heatmaps = torch.rand(batch, 17, pose[0], pose[1], pose[1], generator=g).to(device)
    labels = torch.randint(0, 60, (batch,), generator=g).to(device)
    return imgs, heatmaps, labels


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(mode, fused, amp, batch, iters, small, device):
    """(clips/s, peak memory MiB or None, final loss or None) of `iters` inference passes or training steps."""
    torch.manual_seed(0)
    model = EPAMNet(num_classes=60, fused=fused, heatmap_size=16 if small else 56).to(device)
    imgs, heatmaps, labels = _clip(batch, small, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    if mode == "inference":
        model.eval()

        def run():
            with torch.no_grad(), autocast:
                return model(imgs, heatmaps)
    else:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=3e-4)

        def run():
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                rgb_logits, pose_logits = model(imgs, heatmaps)
                loss = F.cross_entropy(rgb_logits, labels) + F.cross_entropy(pose_logits, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 40.0)
            optimizer.step()
            return loss.detach()

    out = run()  # warm-up: cuDNN's algorithm choice, allocator growth
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        out = run()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    loss = float(out) if mode == "training" else None
    if loss is not None and not torch.isfinite(torch.tensor(loss)):
        raise RuntimeError(f"{mode} fused={fused} amp={amp}: the loss is {loss}")
    return batch * iters / seconds, peak, loss


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--iters", type=int, default=10, help="timed passes or steps per row (after one warm-up)")
    parser.add_argument("--infer-batch", type=int, default=16)
    parser.add_argument("--train-batch", type=int, default=12, help="the authors' clips per GPU")
    parser.add_argument("--small", action="store_true", help="the embedded config's clip sizes (4 x 64^2, 12 x 16^2)")
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (autocast), comma-separated")
    parser.add_argument("--ops", default="reference,fused", help="reference and/or fused, comma-separated")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_model: no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"EPAM-Net on {name}, torch {torch.__version__}, "
             f"{'EPAM-Net clip sizes (16 x 224^2 RGB, 48 x 56^2 heatmaps)' if not args.small else 'small clips'}; "
             f"{args.iters} timed iterations after one warm-up.", "",
             "| mode | batch | precision | ops | clips/s | vs reference | peak GPU memory | loss |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    for mode, batch in (("inference", args.infer_batch), ("training", args.train_batch)):
        for amp in [p == "bf16" for p in args.precisions.split(",")]:
            if amp and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                continue
            results = {}
            for fused in [ops == "fused" for ops in args.ops.split(",")]:
                results[fused] = measure(mode, fused, amp, batch, args.iters, args.small, device)
                rate, peak, loss = results[fused]
                ratio = f"{rate / results[False][0]:.2f}x" if fused and False in results else ""
                lines.append(f"| {mode} | {batch} | {'bf16 autocast' if amp else 'fp32'} | "
                             f"{'fused' if fused else 'reference'} | {rate:.1f} | {ratio} | "
                             f"{f'{peak:.0f} MiB' if peak is not None else ''} | "
                             f"{f'{loss:.4f}' if loss is not None else ''} |")
                print(lines[-1], flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
