"""Command line: ``python -m epamx info`` and ``python -m epamx demo``."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch

import epamx
from epamx.ops import temporal_shift, temporal_shift_, temporal_shift_reference

# The temporal-shift inputs of EPAM-Net at batch 12: first RGB stage, last RGB stage, first pose stage.
DEMO_SHAPES = [((12, 24, 16, 112, 112), 8), ((12, 192, 16, 7, 7), 8), ((12, 24, 48, 56, 56), 4)]


def _info(args: argparse.Namespace) -> int:
    build = epamx.build_info()
    backends = ["CPU"] + ([f"CUDA (archs {build['cuda_archs']})"] if build["cuda"] else [])
    try:
        ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("epamx::"))
    except AttributeError:
        ops = []
    info = {
        "epamx": epamx.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "compiled backends": backends,
        "built against torch": build["torch_version"],
        "compiler": build["cxx_compiler"],
        "OpenMP": build["openmp"],
        "torch threads": torch.get_num_threads(),
        "CUDA runtime (built)": build["cuda_runtime_version"],
        "CUDA available": torch.cuda.is_available(),
        "GPUs": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "operators": ops,
    }
    if args.model:
        info["model"] = _model_summary(args.num_classes)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            if isinstance(value, dict):
                print(f"{key}:")
                part_width = max(map(len, value))
                for part, text in value.items():
                    print(f"  {part:<{part_width}}  {text}")
                continue
            if isinstance(value, list):
                value = ", ".join(map(str, value)) or "-"
            print(f"{key:<{width}}  {value}")
    return 0


def _model_summary(num_classes: int) -> dict:
    """Parameters per part and multiply-adds (torch.utils.flop_counter, which counts convolutions and matrix
    products) of EPAM-Net on one clip: 16 RGB frames at 224x224 and 48 heatmap frames of 17 joints at 56x56."""
    from torch.utils.flop_counter import FlopCounterMode

    from epamx.models import EPAMNet

    model = EPAMNet(num_classes=num_classes).eval()
    imgs, heatmaps = torch.zeros(1, 3, 16, 224, 224), torch.zeros(1, 17, 48, 56, 56)

    def gmacs(fn, *inputs) -> float:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            fn(*inputs)
        return counter.get_total_flops() / 2e9

    summary = {"RGB backbone GMACs": f"{gmacs(model.rgb_backbone, imgs):.2f}",
               "pose backbone GMACs": f"{gmacs(model.pose_backbone, heatmaps):.2f}"}
    total_macs = gmacs(model, imgs, heatmaps)
    parts = {"RGB backbone": [model.rgb_backbone], "pose backbone": [model.pose_backbone],
             "attention": [model.attention_module], "heads": [model.rgb_cls_head, model.pose_cls_head]}
    for name, modules in parts.items():
        summary[f"{name} parameters"] = f"{sum(p.numel() for m in modules for p in m.parameters()):,}"
    summary["total parameters"] = f"{sum(p.numel() for p in model.parameters()):,} ({num_classes} classes)"
    summary["total GMACs"] = f"{total_macs:.2f} (convolutions and matrix products; the paper's 8.1 GFLOPs also " \
                             "counts batch norm, activations and pooling)"
    return summary


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _demo(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("epamx demo: --device cuda asked for, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    if device.type == "cuda" and not epamx.build_info()["cuda"]:
        print("epamx demo: this build of epamx has no CUDA kernels (see python -m epamx info)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"epamx {epamx.__version__} demo: temporal shift on EPAM-Net's tensors ({device}, {args.dtype}{threads}; "
          f"median of {args.repeats})")
    header = f"{'input (N, C, T, H, W)':<24} {'fold_div':>8} {'reference':>10} {'fused':>9} {'in place':>9} " \
             f"{'fused x':>8} {'in place x':>10}  exact"
    print(header)
    print("-" * len(header))
    all_exact = True
    for shape, fold_div in DEMO_SHAPES:
        shape = (args.batch,) + shape[1:]
        x = torch.randn(shape, device=device).to(dtype)
        expected = temporal_shift_reference(x, fold_div)
        inplace = x.clone()
        exact = torch.equal(temporal_shift(x, fold_div), expected)
        exact &= torch.equal(temporal_shift_(inplace, fold_div), expected)
        all_exact &= exact
        t_ref = _median_seconds(lambda: temporal_shift_reference(x, fold_div), device, args.repeats)
        t_fused = _median_seconds(lambda: temporal_shift(x, fold_div), device, args.repeats)
        t_inplace = _median_seconds(lambda: temporal_shift_(inplace, fold_div), device, args.repeats)
        print(f"{str(shape):<24} {fold_div:>8} {t_ref * 1e3:>8.2f}ms {t_fused * 1e3:>7.2f}ms {t_inplace * 1e3:>7.2f}ms "
              f"{t_ref / t_fused:>7.2f}x {t_ref / t_inplace:>9.2f}x  {'yes' if exact else 'NO'}")
    print("fused = epamx.ops.temporal_shift; in place = epamx.ops.temporal_shift_; x = speed-up over the reference "
          "(zeros_like + slicing)")
    all_exact &= _demo_model(device, args.repeats)
    return 0 if all_exact else 1


def _demo_model(device: torch.device, repeats: int) -> bool:
    """EPAM-Net on one clip: the fused path (channels-last on CPU) against the plain-PyTorch reference path."""
    from epamx.models import EPAMNet

    torch.manual_seed(0)
    model = EPAMNet(num_classes=60).eval().to(device)
    imgs, heatmaps = torch.randn(1, 3, 16, 224, 224, device=device), torch.rand(1, 17, 48, 56, 56, device=device)
    with torch.no_grad():
        model.fused = False
        reference = model(imgs, heatmaps)
        t_ref = _median_seconds(lambda: model(imgs, heatmaps), device, repeats)
        model.fused = True
        if device.type == "cpu":
            model = model.to(memory_format=torch.channels_last_3d)
            imgs = imgs.contiguous(memory_format=torch.channels_last_3d)
            heatmaps = heatmaps.contiguous(memory_format=torch.channels_last_3d)
        fused = model(imgs, heatmaps)
        t_fused = _median_seconds(lambda: model(imgs, heatmaps), device, repeats)
    same = all(torch.allclose(f, r, rtol=1e-4, atol=1e-4) for f, r in zip(fused, reference))
    layout = " (channels-last)" if device.type == "cpu" else ""
    print(f"\nEPAM-Net inference, 1 clip (16 x 224^2 RGB + 48 x 56^2 heatmaps), 2,538,717 parameters: reference path "
          f"{t_ref:.3f} s, fused{layout} {t_fused:.3f} s, {t_ref / t_fused:.2f}x; "
          f"same logits: {'yes' if same else 'NO'}")
    return same


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epamx", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, compiled backends (CPU, CUDA archs), threads, operators")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--model", action="store_true", help="also EPAM-Net's parameters per part and multiply-adds")
    info.add_argument("--num-classes", type=int, default=60, help="classes of the model summarised (default 60)")
    info.set_defaults(run=_info)
    demo = commands.add_parser("demo", help="run and time the fused ops against their references")
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    demo.add_argument("--batch", type=int, default=12, help="clips per batch (default 12, as EPAM-Net trains)")
    demo.add_argument("--repeats", type=int, default=5)
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)
