"""Command line: ``epamx train | eval | predict | render | export | prepare | keypoints | info`` (or
``python -m epamx ...``).

Argument parsing and calls into epamx.train, epamx.inference and epamx.data; nothing else. Bad input (an
:class:`epamx.errors.EpamxError`) is printed as one line with exit code 2; any other error keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from epamx.errors import EpamxError

# The EPAM-Net stage's name before it had one of its own; still accepted by --mode.
_OLD_STAGE_NAME = "fused"


# ---- commands ------------------------------------------------------------------------------------------------------

def _info(args: argparse.Namespace) -> int:
    from epamx.records import installation_info

    info = installation_info()
    if args.model:
        from epamx.models import model_summary

        info["model"] = model_summary(args.num_classes)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
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


def _train_overrides(args: argparse.Namespace) -> List[str]:
    from epamx.config import STAGES, override

    overrides = []
    if args.mode:
        if args.mode == _OLD_STAGE_NAME:
            print("epamx train: --mode fused is now --mode epamnet (the EPAM-Net stage)", file=sys.stderr)
        overrides.append(f"train.mode={'epamnet' if args.mode == _OLD_STAGE_NAME else args.mode}")
    if args.init_from:
        overrides.append(override("train.init_from", list(args.init_from)))
    if args.out:
        overrides.append(override("train.out_dir", args.out))
    if args.device:
        overrides.append(override("train.device", args.device))
    if args.epochs is not None:  # every stage's: a config's per-stage epochs would otherwise take precedence
        overrides += [f"train.epochs={args.epochs}"] + [f"stages.{s}.epochs={args.epochs}" for s in STAGES]
    if args.no_resume:
        overrides.append("train.resume=false")
    return overrides + list(args.overrides)


def _train(args: argparse.Namespace) -> int:
    from epamx import distributed
    from epamx.config import load_config
    from epamx.train import run

    cfg = load_config(args.config, _train_overrides(args))
    data = f"the config's dataset ({cfg.data.dataset}: {cfg.data.ann_file or 'embedded'})"
    if args.generated_data:
        from epamx.data.generated import generated_config

        cfg = generated_config(cfg)
        data = (f"generated stand-in clips at the config's sizes ({cfg.data.ann_file}; not the real data: for speed, "
                f"memory and plumbing only)")
        print(f"epamx: {data}; run folder {cfg.train.out_dir}", flush=True)
    try:
        if args.plan:
            from epamx.train.plan import format_plan, plan_run

            plans = plan_run(cfg, args.plan_iters, args.plan_clips)
            if distributed.is_main():
                device = distributed.init_distributed(cfg.train.device).device
                print(format_plan(plans, args.config, device, data, args.plan_clips is not None, args.generated_data))
            return 0
        result = run(cfg)
    finally:
        distributed.teardown()
    return 3 if result.stopped else 0


def _load(args: argparse.Namespace):
    from epamx.config import override
    from epamx.inference import load

    dtype = getattr(args, "dtype", None)  # eval and predict take --dtype; render does not
    dtype = [override("model.inference_dtype", dtype)] if dtype else []
    return load(args.checkpoint, args.config, list(args.overrides) + dtype, args.device)


def _eval(args: argparse.Namespace) -> int:
    from epamx import distributed
    from epamx.inference import evaluate_checkpoint
    from epamx.records import write_evaluation_report

    try:
        loaded = _load(args)
        split = args.split or loaded.config.data.val_split
        result = evaluate_checkpoint(loaded, split, progress=not args.quiet)
        if not distributed.is_main():
            return 0
    finally:
        distributed.teardown()
    checkpoint = loaded.checkpoint
    out = Path(args.out) if args.out else checkpoint.parent / f"eval-{split}"
    header = {"checkpoint": str(checkpoint), "split": split}
    write_evaluation_report(out, result, f"{checkpoint.name} on {split} ({result.primary})", header)
    if args.json:
        print(json.dumps({**header, **result.summary()}, indent=2))
        return 0
    print(f"{checkpoint} on split {split!r}: {len(result.labels)} clips, one clip per video")
    print(f"{'stream':<8} {'top-1':>7} {'top-5':>7} {'mean class':>11}")
    for stream, m in result.metrics.items():
        print(f"{stream:<8} {100 * m['top1']:6.2f}% {100 * m['top5']:6.2f}% {100 * m['mean_class_accuracy']:10.2f}%")
    print(f"\nper class ({result.primary}):\n{result.per_class_table()}")
    print(f"written: {out}/metrics.json, per_class.txt, confusion.png")
    return 0


def _clips(args: argparse.Namespace, loaded):
    from epamx.inference import clips

    dataset = clips(loaded.config, loaded.class_names, loaded.mode, video=args.video, keypoints=args.keypoints,
                    precropped=args.precropped, ann_file=args.ann, samples=args.sample or (), split=args.split,
                    video_root=args.video_root or "", frame_root=args.frame_root or "", estimator=args.estimator)
    if args.limit:
        dataset.annotations = dataset.annotations[:args.limit]
    return dataset


def _timeline(args: argparse.Namespace, model, loaded) -> int:
    from epamx.errors import ConfigError
    from epamx.inference.timeline import check_windows, predict_timeline, write_timeline

    window, stride = check_windows(args.window, args.stride)
    if not args.video or args.keypoints:
        raise ConfigError("--window classifies one --video, its keypoints estimated on the way (not --keypoints)")

    def show(w):
        if not args.json:
            print(f"{w['start']:9.2f}-{w['end']:.2f} s: " + ", ".join(f"{n} {s:.3f}" for n, s in w["top"]) +
                  ("" if w["person_detected"] else " (no person detected)"), flush=True)

    timeline = predict_timeline(model, loaded.config, loaded.class_names, loaded.mode, args.video, window, stride,
                                estimator=args.estimator, top_k=args.top_k, precropped=args.precropped,
                                device=loaded.device, on_window=show)
    jsonl, png = write_timeline(timeline, args.out)
    if args.json:
        print(json.dumps({**timeline, "written": [str(jsonl), str(png)]}, indent=2))
        return 0
    print(f"{len(timeline['windows'])} windows; {timeline['uncovered']:.2f} s after the last one not classified")
    print(f"written: {jsonl}, {png}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from epamx.inference import load_onnx, predict
    from epamx.inference.timeline import check_windows

    if args.window is not None or args.stride is not None:
        check_windows(args.window, args.stride)  # before the model loads
    if args.onnx:
        loaded = load_onnx(args.onnx, args.config, args.overrides)
        model, source = loaded, loaded.path
    else:
        loaded = _load(args)
        model, source = loaded.optimized(), loaded.checkpoint
    if args.window is not None or args.stride is not None:
        return _timeline(args, model, loaded)
    results = predict(model, loaded.config, _clips(args, loaded), top_k=args.top_k, device=loaded.device)
    if args.json:
        print(json.dumps({"onnx" if args.onnx else "checkpoint": str(source), "clips": results}, indent=2))
        return 0
    for r in results:
        note = "" if r["person_detected"] else " (no person detected)"
        print(f"{r['frame_dir']}: " + ", ".join(f"{name} {score:.3f}" for name, score in r["top"]) + note)
    return 0


def _render(args: argparse.Namespace) -> int:
    from epamx.inference import render_attention, render_video

    loaded = _load(args)
    dataset = _clips(args, loaded)
    for i in range(len(dataset)):
        out = Path(args.out) / f"{dataset.annotations[i]['frame_dir']}.png"
        print(render_attention(loaded.model, loaded.config, dataset, i, out, loaded.device))
        if args.video:
            print(render_video(loaded.model, loaded.config, dataset, i, out.with_suffix(".mp4"), loaded.device))
    return 0


def _export(args: argparse.Namespace) -> int:
    from epamx.inference import export

    out = export(args.checkpoint, args.out, args.format, opset=args.opset, batch_size=args.batch_size,
                 config=args.config, overrides=args.overrides)
    print(f"written: {out} ({out.stat().st_size / 1e6:.1f} MB, {args.format})")
    return 0


def _keypoints(args: argparse.Namespace) -> int:
    from epamx.data.annotations import read_label_map
    from epamx.pose import extract_keypoints, find_videos, labels_from_file, labels_from_folders, read_splits

    videos = find_videos(args.inputs, args.suffixes.split(","))
    classes = read_label_map(args.classes) if args.classes else None
    labels = None
    if args.labels:
        labels, classes = labels_from_file(args.labels, videos, classes)
    elif args.label_folders:
        labels, classes = labels_from_folders(videos)
    report = extract_keypoints(videos, args.out, args.estimator, labels, classes, read_splits(args.split, videos),
                               workers=args.workers, progress=not args.quiet, skip_bad=args.skip_bad)
    failed = report["failed"]
    print(f"keypoints of {report['done']} videos ({report['resumed']} already done) in {report['seconds']:.1f} s, "
          f"{report['frames_per_s']:.1f} frames/s, written to {report['out']}; {len(failed)} skipped"
          + "".join(f"\n  skipped {f['video']}: {f['error']}" for f in failed))
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


# ---- the parser ----------------------------------------------------------------------------------------------------

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


def _clip_counts(text: str):
    """An argparse type: "TRAIN,VAL", two integers >= 1."""
    parts = text.split(",")
    try:
        counts = tuple(int(p) for p in parts)
    except ValueError:
        counts = ()
    if len(counts) != 2 or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected TRAIN,VAL clip counts (two integers >= 1), got {text!r}")
    return counts


def _add_overrides(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                   help=f"config overrides, before, between or after the options, e.g. {example}")


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="runs/embedded",
                   help="a checkpoint, or a run or stage folder (its final.pt; a run folder: the EPAM-Net stage's); "
                        "default runs/embedded")
    p.add_argument("--config", default=None, help="config name or TOML file (default: the checkpoint's run config)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when present)")
    _add_overrides(p, "data.ann_file=x")


def _add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute in this dtype (default: the config's model.inference_dtype, float32); bfloat16 is "
                        "faster on CPUs with avx512_bf16 or AMX")


def _estimator(text: str):
    """An argparse type: --estimator's PoseEstimator class (epamx.pose.load_estimator)."""
    from epamx.pose import load_estimator

    try:
        return load_estimator(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _add_estimator_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--estimator", type=_estimator, default="mediapipe",
                   help="the pose estimator: mediapipe (MediaPipe Pose, one person; the `pose` extra) or "
                        "MODULE:CLASS, a PoseEstimator of your own (epamx.pose)")


def _add_clip_args(p: argparse.ArgumentParser, limit: int) -> None:
    p.add_argument("--ann", default=None, help="annotation pickle (default: the config's dataset)")
    p.add_argument("--sample", nargs="+", default=None, metavar="FRAME_DIR", help="annotation entries to use")
    p.add_argument("--split", default=None, help="a split of the annotation pickle (default: the config's val split)")
    p.add_argument("--video-root", default=None, help="folder of the annotation's videos (default: the config's)")
    p.add_argument("--frame-root", default=None, help="folder of the annotation's frame folders")
    p.add_argument("--video", default=None, help="one video file (its keypoints estimated, or from --keypoints)")
    p.add_argument("--keypoints", default=None, help="its keypoints: .npz or .pkl with 'keypoint' (M, T, V, 2) and "
                                                     "optionally 'keypoint_score', 'img_shape', 'label'")
    _add_estimator_arg(p)
    p.add_argument("--precropped", action="store_true",
                   help="the --video is already cropped to the persons (else it is cropped here)")
    p.add_argument("--limit", type=_at_least(0), default=limit, help=f"at most this many clips (0: all; default "
                                                                     f"{limit})")


def _add_train_command(commands) -> None:
    train = commands.add_parser("train", help="train EPAM-Net (default: the embedded dataset, the authors' three "
                                              "stages), then evaluate")
    train.add_argument("--config", default="embedded", help="a shipped config name (embedded, ntu60_xsub, ...) or a "
                                                            "TOML file")
    train.add_argument("--mode", choices=["all", "pose", "rgb", "epamnet", _OLD_STAGE_NAME], default=None,
                       help="all: pose, then rgb, then epamnet (EPAM-Net) from both (the authors' protocol)")
    train.add_argument("--init-from", nargs="+", default=None, metavar="CHECKPOINT",
                       help="start from these checkpoints (epamx stage checkpoints or the authors' files)")
    train.add_argument("--out", default=None, help="run folder (default runs/<config name>)")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when present)")
    train.add_argument("--epochs", type=_at_least(1), default=None,
                       help="epochs of every stage (over the config's stages.<stage>.epochs)")
    train.add_argument("--generated-data", action="store_true",
                       help="rehearse on generated stand-in clips at the config's sizes (its splits, classes and "
                            "file names; cached), training into <out>-generated: for plumbing, speed and memory, "
                            "before the dataset is there")
    train.add_argument("--plan", action="store_true",
                       help="do not train: measure a few iterations of each stage here and print clips/s, peak "
                            "memory, data loading against compute, advice, and the whole schedule's time")
    train.add_argument("--plan-iters", type=_at_least(1), default=3, metavar="N",
                       help="measured iterations per stage for --plan (after one warm-up; default 3)")
    train.add_argument("--plan-clips", type=_clip_counts, default=None, metavar="TRAIN,VAL",
                       help="training and held-out clips the --plan schedule is for (default: the data's split "
                            "sizes), e.g. 40091,16487 for NTU-60 X-Sub")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="no_resume", action="store_false", default=False,
                        help="continue from the run folder's latest checkpoints (the default: a run started again "
                             "resumes where it stopped)")
    resume.add_argument("--no-resume", dest="no_resume", action="store_true",
                        help="do not continue from the run folder's checkpoints")
    _add_overrides(train, "train.batch_size=16 optim.lr_per_16=0.002")
    train.set_defaults(run=_train)


def _add_eval_command(commands) -> None:
    evaluate = commands.add_parser("eval", help="top-1/top-5/mean class accuracy per stream and summed, confusion "
                                                "matrix PNG, per-class table")
    _add_checkpoint_args(evaluate)
    _add_dtype_arg(evaluate)
    evaluate.add_argument("--split", default=None, help="split to evaluate (default: the config's val split)")
    evaluate.add_argument("--out", default=None, help="folder for metrics.json, per_class.txt, confusion.png")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(run=_eval)


def _add_predict_command(commands) -> None:
    pred = commands.add_parser("predict", help="top-k classes of clips (annotation entries, or a video, its keypoints "
                                               "estimated or given)")
    _add_checkpoint_args(pred)
    _add_dtype_arg(pred)
    _add_clip_args(pred, limit=0)
    pred.add_argument("--onnx", default=None, metavar="FILE",
                      help="run this exported ONNX file with ONNX Runtime instead of the checkpoint (its input "
                           "pipeline from the file; the data from --config, default a config.toml beside it)")
    pred.add_argument("--top-k", type=_at_least(1), default=5)
    pred.add_argument("--json", action="store_true", help="print JSON")
    pred.add_argument("--window", type=float, default=None, metavar="SECONDS",
                      help="classify the --video window by window, each this long (a timeline)")
    pred.add_argument("--stride", type=float, default=None, metavar="SECONDS",
                      help="seconds from one window's start to the next (default: --window; at most --window)")
    pred.add_argument("--out", default="timelines/", help="with --window: a folder (NAME.timeline.jsonl and .png) "
                                                          "or a prefix (PREFIX.jsonl, PREFIX.png); default timelines/")
    pred.set_defaults(run=_predict)


def _add_render_command(commands) -> None:
    render = commands.add_parser("render", help="PNGs of clips with their heatmaps and EPAM-Net's spatial and "
                                                "temporal attention; with --video also an MP4 to watch")
    _add_checkpoint_args(render)
    _add_clip_args(render, limit=4)
    render.add_argument("--out", default="renders", help="output folder (default renders/)")
    render.set_defaults(run=_render)


def _add_export_command(commands) -> None:
    exp = commands.add_parser("export", help="write a checkpoint's model as an ONNX file or a torch.export program "
                                             "(.pt2), with its input contract")
    exp.add_argument("checkpoint", help="a checkpoint, or a run or stage folder (its final.pt)")
    exp.add_argument("--format", default="onnx", help="onnx (standard operators only) or pt2 (torch.export)")
    exp.add_argument("--out", required=True, help="the file to write")
    exp.add_argument("--opset", type=int, default=None, help="ONNX opset (default and minimum 18)")
    exp.add_argument("--batch-size", type=_at_least(1), default=None,
                     help="a fixed batch size (default: a dynamic batch dimension)")
    exp.add_argument("--config", default=None, help="config name or TOML file (default: the checkpoint's run config)")
    _add_overrides(exp, "model.pose_channels=17")
    exp.set_defaults(run=_export)


def _add_prepare_command(commands) -> None:
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


def _add_keypoints_command(commands) -> None:
    from epamx.pose.videos import VIDEO_SUFFIXES

    keypoints = commands.add_parser("keypoints", help="estimate every video's 2D keypoints (COCO-17) and write them "
                                                      "as a PoseC3D annotation pickle")
    keypoints.add_argument("inputs", nargs="+", metavar="VIDEO_OR_FOLDER",
                           help="videos, or folders searched for videos (named by their path inside the folder)")
    keypoints.add_argument("--out", required=True, help="the annotation pickle to write")
    labels = keypoints.add_mutually_exclusive_group()
    labels.add_argument("--labels", default=None, help="a text file of lines 'NAME LABEL' (LABEL: a class index or "
                                                       "name); default: label 0 for every video")
    labels.add_argument("--label-folders", action="store_true", help="each video's class is its folder's name")
    keypoints.add_argument("--classes", default=None, help="class names, one per line (the order of the labels)")
    keypoints.add_argument("--split", action="append", default=[], metavar="NAME=FILE",
                           help="a split: FILE lists its videos' names, one per line (repeatable; split 'all' holds "
                                "every video)")
    keypoints.add_argument("--suffixes", default=",".join(VIDEO_SUFFIXES),
                           help="video file suffixes searched for in folders (comma-separated)")
    _add_estimator_arg(keypoints)
    keypoints.add_argument("--workers", type=_at_least(0), default=max(1, min(8, len(os.sched_getaffinity(0)))),
                           help="processes, each with its own estimator (0 or 1: this one)")
    keypoints.add_argument("--skip-bad", action="store_true",
                           help="skip unreadable videos (listed at the end) instead of stopping at the first")
    keypoints.add_argument("--quiet", action="store_true", help="no progress bar")
    keypoints.set_defaults(run=_keypoints)


def _add_info_command(commands) -> None:
    info = commands.add_parser("info", help="versions, compiled backends (CPU, CUDA archs), threads, operators")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--model", action="store_true", help="also EPAM-Net's parameters per part and multiply-adds")
    info.add_argument("--num-classes", type=_at_least(1), default=60,
                      help="classes of the model summarised (default 60)")
    info.set_defaults(run=_info)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epamx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_command(commands)
    _add_eval_command(commands)
    _add_predict_command(commands)
    _add_render_command(commands)
    _add_export_command(commands)
    _add_prepare_command(commands)
    _add_keypoints_command(commands)
    _add_info_command(commands)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse, taking config overrides (SECTION.KEY=VALUE) wherever they stand among the options."""
    args, rest = parser.parse_known_args(argv)
    overrides = [t for t in rest if not t.startswith("-") and "=" in t]
    unknown = [t for t in rest if t not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.parse_args(argv)  # exits with argparse's own message about the unrecognised arguments
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    return args


def _one_line(error: Exception) -> str:
    """An error's message as one line: some wrap a library's message of several lines (torch.load's advice)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[0] + (" [...] (EPAMX_DEBUG=1 for the whole message)" if len(lines) > 1 else "")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(_parser(), argv)
    if os.environ.get("EPAMX_DEBUG"):
        return args.run(args)
    try:
        return args.run(args)
    except EpamxError as e:
        print(f"epamx {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
