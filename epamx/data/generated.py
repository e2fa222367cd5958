"""Stand-in data at a config's own sizes, to rehearse or plan a run before its dataset is downloaded.

``generated_config(cfg)`` writes (once; cached like the embedded dataset) a PoseC3D annotation pickle with the
config's split names and class count, and one H.264 video per clip where the config looks for it
(``<video_root>/<frame_dir><video_suffix>``): person-cropped square frames of ``data.frame_size`` pixels (as the
authors' prepared ``_rgb.mp4`` files), keypoints (COCO-17, one or two persons) in a 1920x1080 image, more frames
than a clip samples. The scenes are the embedded dataset's (epamx.data.scenes), so the content is learnable but
not the real dataset's: use it for speed, memory and plumbing, never for accuracy. It returns the config pointed at
that data and at its own run folder (``<train.out_dir>-generated``), so that a rehearsal never mixes with the
real run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict

import numpy as np

from epamx.data.annotations import dump_annotations
from epamx.data.decoding import write_video
from epamx.data.embedded import cache_root
from epamx.data.scenes import CLASSES, render_clip
from epamx.errors import DataError

__all__ = ["GENERATED_IMAGE", "generated_config", "write_generated_dataset"]

GENERATED_IMAGE = (1080, 1920)   # (h, w) of the image the keypoints refer to, as NTU RGB+D's videos
_VERSION = 1                     # bump when the output changes


def _spec(cfg, train_clips: int, val_clips: int, seed: int) -> Dict:
    d = cfg.data
    return {"version": _VERSION, "train_split": d.train_split, "val_split": d.val_split,
            "num_classes": cfg.model.num_classes or len(CLASSES), "frame_size": d.frame_size,
            "frames": 2 * d.clip_len + 5, "suffix": d.video_suffix, "train": train_clips, "val": val_clips,
            "seed": seed}


def _clip(spec: Dict, index: int, label: int) -> Dict:
    """One clip: the scene of class ``label`` mod the embedded dataset's classes, its keypoints placed in a
    1920x1080 image (the person-cropped frames are a square around them)."""
    rng = np.random.RandomState([spec["seed"], 104729, index])
    clip = render_clip(rng, label % len(CLASSES), spec["frames"], spec["frame_size"])
    h, w = GENERATED_IMAGE
    scale = h / spec["frame_size"] * rng.uniform(0.6, 0.9)
    offset = np.array([rng.uniform(0.1, 0.9) * (w - scale * spec["frame_size"]), (h - scale * spec["frame_size"]) / 2])
    kp = clip["keypoint"]
    kp = np.where(kp == 0, 0, kp * scale + offset).astype(np.float32)
    return {"label": label, "img_shape": GENERATED_IMAGE, "original_shape": GENERATED_IMAGE,
            "total_frames": spec["frames"], "keypoint": kp, "keypoint_score": clip["keypoint_score"],
            "frames": clip["frames"]}


def write_generated_dataset(cfg, root, train_clips: int = 6, val_clips: int = 3, seed: int = 0) -> Dict[str, str]:
    """Write the stand-in data for config ``cfg`` into folder ``root`` (see the module docstring) unless it is
    there; return 'ann_file' and 'video_root'. Written into a temporary folder renamed into place when complete."""
    if train_clips < 1 or val_clips < 1:
        raise DataError(f"generated data: train_clips and val_clips must be >= 1, got {train_clips}, {val_clips}")
    spec = _spec(cfg, train_clips, val_clips, seed)
    root = Path(root)
    paths = {"ann_file": str(root / "annotations.pkl"), "video_root": str(root / "videos")}
    if (root / "annotations.pkl").exists():
        return paths
    tmp = root.parent / f".{root.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "videos").mkdir(parents=True)
    try:
        annotations, split, index = [], {spec["train_split"]: [], spec["val_split"]: []}, 0
        for name, count in ((spec["train_split"], train_clips), (spec["val_split"], val_clips)):
            for i in range(count):
                label = (index * 7) % spec["num_classes"]  # spread over the classes
                ann = _clip(spec, index, label)
                ann["frame_dir"] = f"{name}_{i:04d}"
                write_video(tmp / "videos" / f"{ann['frame_dir']}{spec['suffix']}", ann.pop("frames"), threads=1)
                annotations.append(ann)
                split[name].append(ann["frame_dir"])
                index += 1
        classes = [f"class_{i:03d}" for i in range(spec["num_classes"])]
        dump_annotations(tmp / "annotations.pkl", annotations, split, classes)
        (tmp / "spec.json").write_text(json.dumps(spec, indent=1))
        try:
            os.replace(tmp, root)
        except OSError:
            if not (root / "annotations.pkl").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def generated_config(cfg, train_clips: int = 6, val_clips: int = 3, seed: int = 0):
    """``cfg`` reading stand-in data at its own sizes (written on first use under the cache folder:
    data.cache_dir, $EPAMX_CACHE or ~/.cache/epamx) and training into ``<train.out_dir>-generated``."""
    spec = _spec(cfg, train_clips, val_clips, seed)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    paths = write_generated_dataset(cfg, cache_root(cfg.data) / f"generated-{digest}", train_clips, val_clips, seed)
    data = dataclasses.replace(cfg.data, dataset="posec3d", ann_file=paths["ann_file"],
                               video_root=paths["video_root"], frame_root="", rgb_precropped=True, label_map="")
    train = dataclasses.replace(cfg.train, out_dir=cfg.train.out_dir.rstrip("/") + "-generated")
    return dataclasses.replace(cfg, data=data, train=train)
