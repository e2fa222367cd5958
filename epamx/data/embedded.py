"""The embedded dataset: a multimodal action dataset that ships with epamx as code, generated deterministically
from a seed on first use and cached on disk, in the same formats as the real datasets (a PoseC3D annotation
pickle, and an H.264 video or a JPEG folder per clip), so that training on it exercises the real input path.

Its twelve classes (epamx.data.scenes) are built so that the pose and RGB streams are complementary: each stream
alone can tell at most 10 of the 12 apart, the two together all 12. Settings outside what it can generate
(data.embedded.*) raise DataError.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from epamx.data.annotations import dump_annotations
from epamx.data.config import DataConfig, EmbeddedConfig
from epamx.data.decoding import write_frame_folder, write_video
from epamx.data.scenes import CLASSES, render_clip
from epamx.errors import DataError

__all__ = ["build_embedded", "embedded_dir", "CLASSES"]

_VERSION = 6  # bump when the generator's output changes, so old caches are not reused


def cache_root(cfg: DataConfig) -> Path:
    """Where epamx caches generated data: data.cache_dir, else $EPAMX_CACHE, else ~/.cache/epamx."""
    root = cfg.cache_dir or os.environ.get("EPAMX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "epamx")
    return Path(root)


def embedded_dir(cfg: DataConfig) -> Path:
    """The cache folder of the embedded dataset ``cfg.embedded`` describes (a hash of its settings)."""
    spec = json.dumps({"version": _VERSION, **dataclasses.asdict(cfg.embedded)}, sort_keys=True)
    return cache_root(cfg) / f"embedded-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


def _clip_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, 7919, index]).generate_state(1)[0])


def _make_clip(job) -> Dict:
    spec, index, label, frame_dir, out = job
    clip = render_clip(np.random.RandomState(_clip_seed(spec.seed, index)), label, spec.frames, spec.image_size)
    if spec.format == "video":
        write_video(Path(out) / "videos" / f"{frame_dir}.mp4", clip["frames"], threads=1)
    else:
        write_frame_folder(Path(out) / "frames" / frame_dir, clip["frames"])
    return {"frame_dir": frame_dir, "label": label, "img_shape": (spec.image_size, spec.image_size),
            "original_shape": (spec.image_size, spec.image_size), "total_frames": spec.frames,
            "keypoint": clip["keypoint"], "keypoint_score": clip["keypoint_score"]}


def _validate(spec: EmbeddedConfig) -> None:
    if spec.format not in ("video", "frames"):
        raise DataError(f"data.embedded.format must be 'video' or 'frames', got {spec.format!r}")
    if spec.image_size < 16 or spec.image_size % 2:
        raise DataError(f"data.embedded.image_size must be even and >= 16, got {spec.image_size}")
    if spec.frames < 1 or spec.train_per_class < 1 or spec.val_per_class < 1:
        raise DataError(f"data.embedded: frames, train_per_class and val_per_class must be >= 1, got "
                         f"{spec.frames}, {spec.train_per_class}, {spec.val_per_class}")


def _paths(root: Path, spec: EmbeddedConfig) -> Dict[str, str]:
    paths = {"root": str(root), "ann_file": str(root / "embedded.pkl")}
    paths["video_root" if spec.format == "video" else "frame_root"] = str(root / (
        "videos" if spec.format == "video" else "frames"))
    return paths


def build_embedded(cfg: Optional[DataConfig] = None, progress: bool = True, workers: Optional[int] = None
                   ) -> Dict[str, str]:
    """Generate the embedded dataset if its cache folder does not hold it yet; return its paths: 'root',
    'ann_file' and 'video_root' (or 'frame_root'). Splits 'train' and 'val'; labels index ``CLASSES``.

    Generation writes into a temporary folder that is renamed into place when complete, so a killed run leaves
    no half-written dataset behind (and several processes may race to build it: the first rename wins)."""
    cfg = cfg or DataConfig()
    spec = cfg.embedded
    _validate(spec)
    root = embedded_dir(cfg)
    if (root / "embedded.pkl").exists():
        return _paths(root, spec)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / ("videos" if spec.format == "video" else "frames")).mkdir(parents=True)
    jobs, split = [], {"train": [], "val": []}
    for name, per_class in (("train", spec.train_per_class), ("val", spec.val_per_class)):
        for i in range(per_class * len(CLASSES)):
            label = i % len(CLASSES)
            frame_dir = f"{name}_{i:05d}_{CLASSES[label]}"
            split[name].append(frame_dir)
            jobs.append((spec, len(jobs), label, frame_dir, str(tmp)))
    workers = workers if workers is not None else min(len(os.sched_getaffinity(0)), 8)
    start = time.perf_counter()
    try:
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(jobs), desc="epamx: generating the embedded dataset", unit="clip", leave=False)
        annotations = []
        if workers > 1:
            with multiprocessing.get_context().Pool(workers) as pool:
                for ann in pool.imap(_make_clip, jobs, chunksize=4):
                    annotations.append(ann)
                    if bar is not None:
                        bar.update()
        else:
            for job in jobs:
                annotations.append(_make_clip(job))
                if bar is not None:
                    bar.update()
        if bar is not None:
            bar.close()
        dump_annotations(tmp / "embedded.pkl", annotations, split, CLASSES)
        try:
            os.replace(tmp, root)
        except OSError:
            if not (root / "embedded.pkl").exists():  # not another process that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"epamx: embedded dataset ({len(jobs)} clips, {len(CLASSES)} classes) written to {root} in "
              f"{time.perf_counter() - start:.1f} s")
    return _paths(root, spec)
