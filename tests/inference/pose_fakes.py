"""Stand-ins for the pose tests: raw (uncropped, not square) videos of a moving person with their true keypoints,
an estimator that returns those keypoints (it knows each video by its first decoded frame), and a tiny EPAM-Net
checkpoint."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from epamx.data import read_video, write_video
from epamx.pose import PoseEstimator

TABLE_ENV = "POSE_FAKES_TABLE"  # where TableEstimator finds its table when made without one (in a subprocess)
SLOW_ENV = "POSE_FAKES_SLOW"    # seconds TableEstimator waits per video (to be killed in the middle of a run)
# Sizes the tiny model runs at: 6 pose frames at 8x8, 2 RGB frames at 32x32.
TINY = ["data.frame_size=32", "data.heatmap_size=8", "data.clip_len=6", "data.rgb_every=3", "model.channels_last=false"]
CLASSES = ["wave", "clap", "squat"]


def raw_video(path: Path, seed: int, frames: int = 12, height: int = 48, width: int = 64
              ) -> Tuple[np.ndarray, np.ndarray]:
    """A raw video: a bright figure moving over a smooth background, and its true COCO-17 keypoints (1, T, 17, 2)
    and scores (1, T, 17)."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = (96 + 60 * np.sin(xx / rng.uniform(5, 9) + rng.uniform(0, 6)) * np.cos(yy / 7.0))[..., None]
    pictures = np.repeat(np.clip(base, 0, 255), 3, axis=2).astype(np.uint8)[None].repeat(frames, 0).copy()
    centre = np.array([rng.uniform(0.35, 0.65) * width, 0.5 * height])
    offsets = rng.uniform(-1, 1, size=(17, 2)) * np.array([8.0, 14.0])
    kp = np.empty((1, frames, 17, 2), np.float32)
    for t in range(frames):
        kp[0, t] = centre + offsets + np.array([2.0 * np.sin(t / 2), 0])
        for x, y in kp[0, t]:
            pictures[t, max(0, int(y) - 1): int(y) + 2, max(0, int(x) - 1): int(x) + 2] = (250, 200, 40)
    scores = rng.uniform(0.5, 1.0, size=(1, frames, 17)).astype(np.float32)
    write_video(path, pictures)
    return kp, scores


def _key(frame: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(frame).tobytes()).hexdigest()


def write_table(path: Path, videos: Dict[str, Tuple[np.ndarray, np.ndarray]]) -> Path:
    """A table of {video path: (keypoints, scores)} for TableEstimator, keyed by each video's first decoded frame."""
    arrays = {}
    for i, (video, (kp, scores)) in enumerate(videos.items()):
        arrays[f"key{i}"] = np.str_(_key(read_video(video, [0])[0]))
        arrays[f"kp{i}"], arrays[f"score{i}"] = kp, scores
    np.savez(path, **arrays)
    return path


class TableEstimator(PoseEstimator):
    """Returns the true keypoints of the videos of a table (write_table); a video it does not know has nobody in it
    (score 0 everywhere)."""

    def __init__(self, table: Optional[str] = None):
        self.table = table or os.environ[TABLE_ENV]
        with np.load(self.table) as f:
            count = len([k for k in f.files if k.startswith("key")])
            self.known = {str(f[f"key{i}"]): (f[f"kp{i}"], f[f"score{i}"]) for i in range(count)}
        self.slow = float(os.environ.get(SLOW_ENV, "0"))
        self.reset()

    def reset(self):
        self.video, self.position = None, 0

    def estimate(self, frames):
        if self.position == 0:
            self.video = self.known.get(_key(frames[0]))
            time.sleep(self.slow)
        t = len(frames)
        if self.video is None:
            kp, scores = np.zeros((1, t, 17, 2), np.float32), np.zeros((1, t, 17), np.float32)
        else:
            kp = self.video[0][:, self.position: self.position + t]
            scores = self.video[1][:, self.position: self.position + t]
        self.position += t
        return kp, scores


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """An untrained EPAM-Net for CLASSES, saved as epamx saves a stage's final weights."""
    from epamx.models import build_model
    from epamx.train.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = build_model("epamnet", len(CLASSES), 17)
    meta = {"mode": "epamnet", "num_classes": len(CLASSES), "pose_channels": 17, "class_names": CLASSES}
    return save_checkpoint({"meta": meta, "model": model.state_dict()}, path)
