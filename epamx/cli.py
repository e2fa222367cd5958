"""Command line: ``python -m epamx train | eval | predict | render | prepare | info | demo``.

This module parses arguments and calls into epamx.train and epamx.data; it holds no logic of its own."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
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
        "CPU kernels": build["cpu_isa"],
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
    """EPAM-Net on one clip, like with like: the fused ops against the plain-PyTorch reference ops in the same memory
    format; the memory-format gain and optimize_for_inference on their own lines."""
    from epamx.models import EPAMNet, optimize_for_inference, preferred_memory_format

    torch.manual_seed(0)
    model = EPAMNet(num_classes=60, memory_format="contiguous").eval().to(device)
    imgs, heatmaps = torch.randn(1, 3, 16, 224, 224, device=device), torch.rand(1, 17, 48, 56, 56, device=device)
    fast_format = "channels_last_3d" if preferred_memory_format(device) == torch.channels_last_3d else "contiguous"
    formats = ["contiguous"] + ([fast_format] if fast_format != "contiguous" else [])
    times, outputs = {}, {}
    with torch.no_grad():
        for fmt in formats:
            model.memory_format = fmt
            for fused in (False, True):
                model.fused = fused
                outputs[fmt, fused] = model(imgs, heatmaps)
                times[fmt, fused] = _median_seconds(lambda: model(imgs, heatmaps), device, repeats)
        model.fused = True
        model.memory_format = "contiguous"
        fast = optimize_for_inference(model, fast_format)
        outputs["optimized"] = fast(imgs, heatmaps)
        times["optimized"] = _median_seconds(lambda: fast(imgs, heatmaps), device, repeats)
    reference = outputs["contiguous", False]
    same = all(torch.allclose(o, r, rtol=1e-4, atol=1e-4) for out in outputs.values() for o, r in zip(out, reference))
    print(f"\nEPAM-Net inference, 1 clip (16 x 224^2 RGB + 48 x 56^2 heatmaps), 2,538,717 parameters, median of "
          f"{repeats}:")
    base = times["contiguous", False]
    for fmt in formats:
        ref, fused = times[fmt, False], times[fmt, True]
        print(f"  {fmt:<17} reference ops {ref:.3f} s, fused ops {fused:.3f} s: fused {ref / fused:.2f}x")
    if len(formats) > 1:
        print(f"  memory format: {fast_format} vs contiguous, fused ops: "
              f"{times['contiguous', True] / times[fast_format, True]:.2f}x (EPAMNet's default on {device.type})")
    print(f"  optimize_for_inference (batch norm folded, {fast_format}): {times['optimized']:.3f} s, "
          f"{base / times['optimized']:.2f}x the contiguous reference, "
          f"{times[formats[-1], True] / times['optimized']:.2f}x EPAMNet's default")
    print(f"  same logits everywhere (within 1e-4): {'yes' if same else 'NO'}")
    return same


# ---- training and using models -------------------------------------------------------------------------------------

def _user_errors():
    """Exceptions that mean bad input (a path, a config, a file): printed as one line, not a traceback."""
    from epamx.data import AnnotationError, DecodeError, SampleError
    from epamx.train.checkpoint import CheckpointError
    from epamx.train.config import ConfigError

    return (ConfigError, CheckpointError, AnnotationError, DecodeError, SampleError, FileNotFoundError,
            FileExistsError, NotADirectoryError, ValueError)


def _one_line(error: Exception) -> str:
    """An error's message as one line: some wrap a library's message of several lines (torch.load's advice)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[0] + (" [...] (EPAMX_DEBUG=1 for the whole message)" if len(lines) > 1 else "")


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid TOML basic string


def _train_overrides(args: argparse.Namespace) -> list:
    overrides = []
    if args.mode:
        overrides.append(f"train.mode={args.mode}")
    if args.init_from:
        overrides.append(f"train.init_from=[{', '.join(_toml_string(p) for p in args.init_from)}]")
    if args.out:
        overrides.append(f"train.out_dir={_toml_string(args.out)}")
    if args.device:
        overrides.append(f"train.device={_toml_string(args.device)}")
    if args.epochs is not None:  # every stage's: a config's per-stage epochs would otherwise take precedence
        overrides += [f"train.epochs={args.epochs}", "train.pose_epochs=0", "train.rgb_epochs=0",
                      "train.fused_epochs=0"]
    if args.no_resume:
        overrides.append("train.resume=false")
    return overrides + list(args.overrides)


def _check_device(cfg) -> None:
    """train.device is a device torch has here: asked for where there is none, it is bad input, not a crash."""
    from epamx.train.config import ConfigError

    device = cfg.train.device
    try:
        resolved = torch.device("cpu" if device == "auto" else device)
    except RuntimeError:
        raise ConfigError(f"train.device = {device!r} is not a device torch knows (auto, cpu, cuda, cuda:1, ...)") \
            from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {device!r}, but torch sees no CUDA GPU here (--device cpu)")


def _train(args: argparse.Namespace) -> int:
    from epamx.train import load_config, run
    from epamx.train import distributed

    cfg = load_config(args.config, _train_overrides(args))
    _check_device(cfg)
    try:
        result = run(cfg)
    finally:
        distributed.teardown()
    return 3 if result.stopped else 0


def _checkpoint_and_config(args: argparse.Namespace):
    from epamx.train.inference import config_for_checkpoint, resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={_toml_string(args.device)}")
    cfg = config_for_checkpoint(checkpoint, args.config, overrides)
    _check_device(cfg)
    return checkpoint, cfg


def _eval(args: argparse.Namespace) -> int:
    from epamx.train import distributed, evaluate_checkpoint
    from epamx.plots import plot_confusion_matrix

    checkpoint, cfg = _checkpoint_and_config(args)
    split = args.split or cfg.data.val_split
    try:
        result = evaluate_checkpoint(cfg, checkpoint, split, progress=not args.quiet)
        if not distributed.is_main():
            return 0
    finally:
        distributed.teardown()
    out = Path(args.out) if args.out else checkpoint.parent / f"eval-{split}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"checkpoint": str(checkpoint), "split": split,
                                                  **result.summary()}, indent=2))
    table = result.per_class_table()
    (out / "per_class.txt").write_text(table + "\n")
    plot_confusion_matrix(result.confusion(), out / "confusion.png", result.class_names,
                          title=f"{checkpoint.name} on {split} ({result.primary})")
    if args.json:
        print(json.dumps({"checkpoint": str(checkpoint), "split": split, **result.summary()}, indent=2))
        return 0
    print(f"{checkpoint} on split {split!r}: {len(result.labels)} clips, one clip per video")
    print(f"{'stream':<8} {'top-1':>7} {'top-5':>7} {'mean class':>11}")
    for stream, m in result.metrics.items():
        print(f"{stream:<8} {100 * m['top1']:6.2f}% {100 * m['top5']:6.2f}% {100 * m['mean_class_accuracy']:10.2f}%")
    print(f"\nper class ({result.primary}):\n{table}")
    print(f"\nwritten: {out}/metrics.json, per_class.txt, confusion.png")
    return 0


def _clips(args: argparse.Namespace, cfg, class_names, mode):
    from epamx.train.inference import clip_from_video, clips_from_annotations

    if args.video or args.keypoints:
        if not (args.video and args.keypoints):
            raise ValueError("--video and --keypoints go together (a video and its keypoints file)")
        return clip_from_video(cfg, class_names, mode, args.video, args.keypoints, precropped=args.precropped)
    ann_file = args.ann
    if ann_file is None:
        if cfg.data.dataset == "embedded":
            from epamx.data.embedded import build_embedded

            ann_file = build_embedded(cfg.data, progress=False)["ann_file"]
        else:
            ann_file = cfg.data.ann_file
    split = args.split if args.split or args.sample else cfg.data.val_split
    return clips_from_annotations(cfg, class_names, mode, ann_file, args.sample or (), split,
                                  video_root=args.video_root or "", frame_root=args.frame_root or "")


def _load_for_inference(args: argparse.Namespace):
    from epamx.train import load_model
    from epamx.train.distributed import resolve_device

    checkpoint, cfg = _checkpoint_and_config(args)
    device = resolve_device(cfg.train.device)
    model, meta = load_model(checkpoint, device, cfg.model.fused)
    class_names = meta.get("class_names") or [f"class_{i}" for i in range(meta["num_classes"])]
    return checkpoint, cfg, device, model, meta, class_names


def _predict(args: argparse.Namespace) -> int:
    from epamx.train.inference import predict
    from epamx.train.loop import inference_model

    checkpoint, cfg, device, model, meta, class_names = _load_for_inference(args)
    model = inference_model(model, cfg.model.channels_last, device)
    dataset = _clips(args, cfg, class_names, meta["mode"])
    if args.limit:
        dataset.annotations = dataset.annotations[:args.limit]
    results = predict(model, cfg, dataset, top_k=args.top_k, device=device)
    if args.json:
        print(json.dumps({"checkpoint": str(checkpoint), "clips": results}, indent=2))
        return 0
    for r in results:
        top = ", ".join(f"{name} {score:.3f}" for name, score in r["top"])
        print(f"{r['frame_dir']}: {top}")
    return 0


def _render(args: argparse.Namespace) -> int:
    from epamx.train.inference import render_attention

    checkpoint, cfg, device, model, meta, class_names = _load_for_inference(args)
    dataset = _clips(args, cfg, class_names, meta["mode"])
    count = min(len(dataset), args.limit or len(dataset))
    out = Path(args.out)
    for i in range(count):
        png = render_attention(model, cfg, dataset, i, out / f"{dataset.annotations[i]['frame_dir']}.png", device)
        print(png)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from epamx.data.prepare import prepare_videos

    report = prepare_videos(args.ann, args.video_root, args.out, video_suffix=args.suffix, out_suffix=args.out_suffix,
                            size=args.size, split=args.split, workers=args.workers, progress=not args.quiet,
                            skip_bad=args.skip_bad)
    failed = report.get("failed") or []
    print(f"prepared {report['done']} clips ({report['skipped_existing']} already done) in {report['seconds']:.1f} s, "
          f"{report['clips_per_s']:.2f} clips/s; {len(failed)} failed" + (f": {failed[:5]}" if failed else ""))
    return 1 if failed and not args.skip_bad else 0


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum (a count of 0 or less would quietly print nothing)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _add_checkpoint_args(p: argparse.ArgumentParser, default: Optional[str] = "runs/embedded") -> None:
    p.add_argument("--checkpoint", default=default,
                   help="a checkpoint, or a run or stage folder (its final.pt; a run folder: the fused stage's); "
                        f"default {default}")
    p.add_argument("--config", default=None, help="config name or TOML file (default: the checkpoint's run config)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when present)")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides, e.g. data.ann_file=x")


def _add_clip_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ann", default=None, help="annotation pickle (default: the config's dataset)")
    p.add_argument("--sample", nargs="+", default=None, metavar="FRAME_DIR", help="annotation entries to use")
    p.add_argument("--split", default=None, help="a split of the annotation pickle (default: the config's val split)")
    p.add_argument("--video-root", default=None, help="folder of the annotation's videos (default: the config's)")
    p.add_argument("--frame-root", default=None, help="folder of the annotation's frame folders")
    p.add_argument("--video", default=None, help="one video file (with --keypoints)")
    p.add_argument("--keypoints", default=None, help="its keypoints: .npz or .pkl with 'keypoint' (M, T, V, 2) and "
                                                     "optionally 'keypoint_score', 'img_shape', 'label'")
    p.add_argument("--precropped", action="store_true",
                   help="the --video is already cropped to the persons (else it is cropped here)")
    p.add_argument("--limit", type=_at_least(0), default=0, help="at most this many clips (0: all)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epamx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train EPAM-Net (default: the embedded dataset, the authors' three "
                                              "stages), then evaluate")
    train.add_argument("--config", default="embedded", help="a shipped config name (embedded, ntu60_xsub, ...) or a "
                                                            "TOML file")
    train.add_argument("--mode", choices=["all", "pose", "rgb", "fused"], default=None,
                       help="all: pose, then rgb, then fused from both (the authors' protocol)")
    train.add_argument("--init-from", nargs="+", default=None, metavar="CHECKPOINT",
                       help="start from these checkpoints (epamx stage checkpoints or the authors' files)")
    train.add_argument("--out", default=None, help="run folder (default runs/<config name>)")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when present)")
    train.add_argument("--epochs", type=int, default=None,
                       help="epochs of every stage (over the config's train.<stage>_epochs)")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="no_resume", action="store_false", default=False,
                        help="continue from the run folder's latest checkpoints (the default: a run started again "
                             "resumes where it stopped)")
    resume.add_argument("--no-resume", dest="no_resume", action="store_true",
                        help="do not continue from the run folder's checkpoints")
    train.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                       help="any config value, e.g. train.batch_size=16 optim.lr_per_16=0.002")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="top-1/top-5/mean class accuracy per stream and fused, confusion "
                                                "matrix PNG, per-class table")
    _add_checkpoint_args(evaluate)
    evaluate.add_argument("--split", default=None, help="split to evaluate (default: the config's val split)")
    evaluate.add_argument("--out", default=None, help="folder for metrics.json, per_class.txt, confusion.png")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(run=_eval)

    pred = commands.add_parser("predict", help="top-k classes of clips (annotation entries, or a video + keypoints)")
    _add_checkpoint_args(pred)
    _add_clip_args(pred)
    pred.add_argument("--top-k", type=_at_least(1), default=5)
    pred.add_argument("--json", action="store_true", help="print JSON")
    pred.set_defaults(run=_predict)

    render = commands.add_parser("render", help="PNGs of clips with their heatmaps and EPAM-Net's spatial and "
                                                "temporal attention")
    _add_checkpoint_args(render)
    _add_clip_args(render)
    render.add_argument("--out", default="renders", help="output folder (default renders/)")
    render.set_defaults(run=_render, limit=4)

    prepare = commands.add_parser("prepare", help="crop raw videos to the persons and resize them, as the authors "
                                                  "prepared their RGB input")
    prepare.add_argument("--ann", required=True, help="annotation pickle")
    prepare.add_argument("--video-root", required=True, help="folder of the raw videos")
    prepare.add_argument("--out", required=True, help="output folder (the only place written to)")
    prepare.add_argument("--suffix", default=".mp4", help="raw video name suffix after frame_dir (default .mp4)")
    prepare.add_argument("--out-suffix", default="_rgb.mp4", help="output name suffix (default _rgb.mp4)")
    prepare.add_argument("--size", type=int, default=224, help="output frame side (default 224)")
    prepare.add_argument("--split", default=None, help="only this split")
    prepare.add_argument("--workers", type=_at_least(0), default=max(1, min(8, len(os.sched_getaffinity(0)))))
    prepare.add_argument("--skip-bad", action="store_true", help="skip unreadable videos (listed) instead of stopping")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    prepare.set_defaults(run=_prepare)
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
    if args.command in ("train", "eval", "predict", "render", "prepare") and not os.environ.get("EPAMX_DEBUG"):
        try:
            return args.run(args)
        except _user_errors() as e:
            print(f"epamx {args.command}: error: {_one_line(e)}", file=sys.stderr)
            return 2
    return args.run(args)
