"""What the input pipeline reads and how: a frozen dataclass per TOML table ([data] and [data.embedded]).

The run's config (epamx.config) nests these; they are defined here so that the data layer can be
used without it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DataConfig", "EmbeddedConfig"]


@dataclass(frozen=True)
class EmbeddedConfig:
    """The procedural dataset that ships with epamx (epamx.data.embedded): generated from ``seed``, cached on disk.

    Sizes are parameters: RGB frames are ``frame_size`` square, heatmaps ``DataConfig.heatmap_size``; keep the
    frame side 4x the heatmap side so both streams end at the same feature-map size.
    """
    seed: int = 0
    train_per_class: int = 48        # clips per class in the "train" split
    val_per_class: int = 16          # clips per class in the "val" split
    frames: int = 48                 # frames per video (before sampling)
    image_size: int = 64             # side of the rendered scene (the videos' frames), pixels
    format: str = "video"            # "video" (one .mp4 per clip, PyAV) or "frames" (JPEG folders)


@dataclass(frozen=True)
class DataConfig:
    """The dataset, where its files are, and the paper's sampling and rendering parameters."""
    dataset: str = "embedded"        # "embedded" (ships with epamx) or "posec3d" (an annotation pickle + RGB)
    ann_file: str = ""               # PoseC3D / pyskl annotation pickle (dataset = "posec3d")
    train_split: str = "train"       # split names in the pickle's 'split' dict (NTU-60 X-Sub: xsub_train / xsub_val)
    val_split: str = "val"
    video_root: str = ""             # RGB as videos: <video_root>/<frame_dir><video_suffix>
    video_suffix: str = ".mp4"
    frame_root: str = ""             # or as JPEG folders: <frame_root>/<frame_dir>/<frame_template % (i + 1)>
    frame_template: str = "img_{:05d}.jpg"
    label_map: str = ""              # class names, one per line (else the pickle's 'classes', else class_<i>)
    rgb_precropped: bool = True      # videos already cropped to the persons (the authors' _rgb.mp4, `epamx prepare`)
    clip_len: int = 48               # pose frames sampled per clip
    rgb_every: int = 3               # RGB frames = every rgb_every-th pose frame (48 -> 16)
    frame_size: int = 224            # RGB frames, pixels (square)
    heatmap_size: int = 56           # heatmaps, pixels (square)
    sigma: float = 0.6
    eps: float = 1e-4                # mmaction2's GeneratePoseTarget (pyskl: 1e-3)
    max_persons: int = 2             # persons per clip kept (the highest-scoring ones)
    skeleton: str = "coco17"         # joint layout: "coco17", "ntu25" (left/right pairs for flipping) or "any"
    flip_prob: float = 0.5           # horizontal flip when training
    keypoint_flip: str = "mirror"    # a flipped keypoint's x: "mirror" (W - 1) - x, as the frames; "authors" W - x
    skip_bad: bool = False           # skip unreadable samples (counted and logged) instead of stopping
    cache_dir: str = ""              # where the embedded dataset is cached ("" = $EPAMX_CACHE or ~/.cache/epamx)
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)
