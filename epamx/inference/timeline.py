"""A long video, window by window (``epamx predict --video X --window S --stride S``): what the person does over time.

The video is decoded once, in order, by a thread that hands chunks of frames to the pose estimator
(epamx.data.decode_chunks: PyAV releases the GIL while it decodes, so decoding and pose estimation overlap). Windows are ``window`` seconds long and start
every ``stride`` seconds from the first frame: [k * stride, k * stride + window). Each window is one clip, sampled as
the dataset samples a clip in test mode (the config's clip_len frames uniformly over the window, every rgb_every-th
of them for the RGB stream) and cropped to the persons' box over the window's keypoints, as ``prepare`` crops a
clip. **The last window ends at or before the video's end**: a tail shorter than a stride after it is not classified
on its own (the timeline says how long it is); a video shorter than one window is an error naming --window.

What is kept while streaming: the keypoints of every frame (small), and the full frames that the open windows sample
for their RGB stream (at most ceil(window / stride) windows' worth), each dropped once no open window needs it; a
window is classified as soon as the estimator has passed its last frame.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from epamx.config import Config
from epamx.data import ClipDataset, get_pipeline
from epamx.data.decoding import DecodeError, decode_chunks
from epamx.data.sampling import rgb_frame_indices, uniform_sample_frames
from epamx.errors import ConfigError, DataError, DataFileNotFound
from epamx.models.streams import modalities
from epamx.pose.estimator import EstimatorFactory, PoseEstimator, check_estimate, load_estimator
from epamx.pose.extract import concat_persons
from epamx.records import atomic_write_text

__all__ = ["WindowPlan", "check_windows", "predict_timeline", "timeline_paths", "write_timeline"]

CHUNK = 16  # frames per hand-over from the decoding thread to the estimator
_QUEUE = 2  # chunks decoded ahead of the estimator


def check_windows(window: Optional[float], stride: Optional[float]) -> Tuple[float, float]:
    """(window, stride) in seconds; stride defaults to the window. Raises ConfigError naming the option."""
    if window is None:
        raise ConfigError("--stride needs --window (the window's length in seconds)")
    if not window > 0:
        raise ConfigError(f"--window must be > 0 seconds, got {window}")
    stride = window if stride is None else stride
    if not 0 < stride <= window:
        raise ConfigError(f"--stride must be > 0 and <= --window ({window} s), got {stride}")
    return float(window), float(stride)


class WindowPlan:
    """Windows of ``length`` frames starting every ``stride`` frames, and the frames each samples (``offsets``,
    relative to its start; ``rgb_offsets`` those of the RGB stream)."""

    def __init__(self, fps: float, window: float, stride: float, clip_len: int, rgb_every: int,
                 rgb_sampling: Optional[str] = "every"):
        self.fps = fps
        self.length = max(1, round(window * fps))
        self.stride = max(1, min(self.length, round(stride * fps)))
        self.offsets = uniform_sample_frames(self.length, clip_len, test_mode=True)
        if rgb_sampling == "direct":  # the rgb_only pipeline samples its frames on their own
            rgb = uniform_sample_frames(self.length, clip_len // rgb_every, test_mode=True)
        else:
            rgb = rgb_frame_indices(self.offsets, rgb_every)
        self.rgb_offsets = set(rgb.tolist())

    def start(self, k: int) -> int:
        return k * self.stride

    def windows_of(self, frame: int) -> range:
        """The windows k whose frames include ``frame``."""
        return range(max(0, -(-(frame - self.length + 1) // self.stride)), frame // self.stride + 1)

    def rgb_needed(self, frame: int) -> bool:
        return any(frame - self.start(k) in self.rgb_offsets for k in self.windows_of(frame))

    def count(self, total_frames: int) -> int:
        """Windows that fit in ``total_frames`` frames."""
        return 0 if total_frames < self.length else (total_frames - self.length) // self.stride + 1


class _WindowClips(ClipDataset):
    """One window as a one-clip dataset whose RGB frames come from memory, not from a file."""

    def __init__(self, ann: Dict[str, Any], frames: Dict[int, np.ndarray], start: int, **kwargs):
        super().__init__([ann], train=False, video_root="<memory>", **kwargs)
        self._held, self._start = frames, start

    def _read_frames(self, ann: Dict[str, Any], inds: np.ndarray) -> np.ndarray:
        return np.stack([self._held[self._start + int(i)] for i in inds])


class _Keypoints:
    """Every frame's keypoints, chunk by chunk, and any stretch of them with the persons padded alike."""

    def __init__(self):
        self.starts: List[int] = []
        self.kp: List[np.ndarray] = []
        self.scores: List[np.ndarray] = []

    def add(self, start: int, kp: np.ndarray, scores: np.ndarray) -> None:
        self.starts.append(start)
        self.kp.append(kp)
        self.scores.append(scores)

    def stretch(self, a: int, b: int) -> Tuple[np.ndarray, np.ndarray]:
        """Keypoints (M, b - a, V, 2) and scores (M, b - a, V) of frames [a, b)."""
        kp, sc = [], []
        for s, k, c in zip(self.starts, self.kp, self.scores):
            if s < b and s + k.shape[1] > a:
                lo, hi = max(a, s) - s, min(b, s + k.shape[1]) - s
                kp.append(k[:, lo:hi])
                sc.append(c[:, lo:hi])
        return concat_persons(kp, self.kp[0].shape[2:]), concat_persons(sc, self.scores[0].shape[2:])


def _window_result(prediction: Dict[str, Any], plan: WindowPlan, k: int) -> Dict[str, Any]:
    start = plan.start(k)
    return {"window": k, "start": round(start / plan.fps, 3), "end": round((start + plan.length) / plan.fps, 3),
            "start_frame": start, "end_frame": start + plan.length, "top": prediction["top"],
            "person_detected": prediction["person_detected"]}


def predict_timeline(model, cfg: Config, class_names: Sequence[str], mode: str, video: os.PathLike, window: float,
                     stride: Optional[float] = None, estimator: Optional[EstimatorFactory] = None, top_k: int = 5,
                     precropped: bool = False, device: torch.device = torch.device("cpu"),
                     on_window: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Every window's top-k classes (see the module docstring): {'video', 'fps', 'frames', 'window', 'stride',
    'uncovered' (seconds after the last window), 'windows': [{'window', 'start', 'end' (seconds), 'start_frame',
    'end_frame', 'top': [(class, score)], 'person_detected'}], 'peak_frames_held'}. ``on_window`` is called with
    each window's entry as soon as it is known. Raises ConfigError (window, stride), DataFileNotFound, DecodeError,
    or DataError for a video shorter than one window."""
    from epamx.inference.predict import predict

    window, stride = check_windows(window, stride)
    path = os.fspath(video)
    if not os.path.isfile(path):
        raise DataFileNotFound(f"video {path} does not exist")
    d, pipeline = cfg.data, cfg.stage(mode).pipeline
    made: PoseEstimator = (estimator or load_estimator("mediapipe"))()
    made.reset()
    keypoints, held, results = _Keypoints(), {}, []
    plan, shape, total, peak, next_k = None, None, 0, 0, 0
    try:
        for first, chunk, stream in decode_chunks(path, CHUNK, _QUEUE):
            if plan is None:
                fps = float(stream.average_rate or stream.guessed_rate or 30)
                plan = WindowPlan(fps, window, stride, d.clip_len, d.rgb_every, get_pipeline(pipeline).rgb_sampling)
                shape = chunk.shape[1:3]
            held.update({first + i: chunk[i].copy() for i in range(len(chunk)) if plan.rgb_needed(first + i)})
            keypoints.add(first, *check_estimate(*made.estimate(chunk), len(chunk), made.num_joints,
                                                 type(made).__name__))
            total = first + len(chunk)
            peak = max(peak, len(held))
            while plan.start(next_k) + plan.length <= total:
                start = plan.start(next_k)
                kp, sc = keypoints.stretch(start, start + plan.length)
                ann = {"frame_dir": Path(path).name.split(".")[0], "label": len(class_names), "img_shape": shape,
                       "original_shape": shape, "total_frames": plan.length, "keypoint": kp, "keypoint_score": sc}
                clip = _WindowClips(ann, held, start, class_names=class_names, modalities=modalities(mode),
                                    rgb_precropped=precropped, clip_len=d.clip_len, rgb_every=d.rgb_every,
                                    frame_size=d.frame_size, max_persons=d.max_persons, pipeline=pipeline,
                                    heatmap_size=d.heatmap_size)
                (prediction,) = predict(model, cfg, clip, top_k=top_k, batch_size=1, device=device)
                results.append(_window_result(prediction, plan, next_k))
                if on_window is not None:
                    on_window(results[-1])
                next_k += 1
                for i in [i for i in held if i < plan.start(next_k)]:
                    del held[i]
    finally:
        made.close()
    if shape is None:
        raise DecodeError(f"{path}: the video has no frames")
    if not results:
        raise DataError(f"--window {window:g} s is longer than the video {path} ({total / plan.fps:.2f} s, "
                        f"{total} frames)")
    last_end = results[-1]["end_frame"]
    return {"video": path, "fps": plan.fps, "frames": total, "window": window, "stride": stride,
            "uncovered": round((total - last_end) / plan.fps, 3), "windows": results, "peak_frames_held": peak}


def timeline_paths(out: os.PathLike, video: os.PathLike) -> Tuple[Path, Path]:
    """The JSON-lines and PNG files of a timeline: ``out`` a folder (one that exists, or a name ending in '/') gets
    <video name>.timeline.jsonl and .png; any other ``out`` is a prefix: <out>.jsonl and <out>.png."""
    text = os.fspath(out)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        base = Path(text) / (Path(video).name.split(".")[0] + ".timeline")
    else:
        base = Path(text)
    return base.with_name(base.name + ".jsonl"), base.with_name(base.name + ".png")


def write_timeline(timeline: Dict[str, Any], out: os.PathLike) -> Tuple[Path, Path]:
    """The timeline as JSON lines (one window a line: start, end, top-k, person_detected) and a PNG (each window's
    top class as a bar over its time, as high as its score), both written atomically. Returns their paths."""
    import json

    from epamx.plots import pyplot, save_figure

    jsonl, png = timeline_paths(out, timeline["video"])
    lines = [json.dumps({"start": w["start"], "end": w["end"], "top": w["top"],
                         "person_detected": w["person_detected"]}) for w in timeline["windows"]]
    atomic_write_text(jsonl, "\n".join(lines) + "\n")
    plt = pyplot()
    classes = list(dict.fromkeys(w["top"][0][0] for w in timeline["windows"]))
    colours = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(max(6.0, min(20.0, 0.4 * len(timeline["windows"]))), 3.2))
    for w in timeline["windows"]:
        name, score = w["top"][0]
        ax.barh(score / 2, w["end"] - w["start"], left=w["start"], height=score, alpha=0.45,
                color=colours(classes.index(name) % 20), edgecolor="black", linewidth=0.3)
    for i, name in enumerate(classes):
        ax.bar([0], [0], color=colours(i % 20), label=name)
    ax.set_xlim(0, timeline["frames"] / timeline["fps"])
    ax.set_ylim(0, 1)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("top-1 score")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"{Path(timeline['video']).name}: windows of {timeline['window']:g} s every "
                 f"{timeline['stride']:g} s", fontsize=9)
    save_figure(fig, png, dpi=100)
    return jsonl, png
