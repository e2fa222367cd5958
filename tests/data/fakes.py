"""Small fake data for the data-layer tests: PoseC3D-style annotations and videos whose frames say their index."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from epamx.data import write_video

# Frame i of a numbered video: the left half's grey level says i % 16, the right half's i // 16 (steps of 16 grey
# levels survive H.264 and JPEG with room to spare).
_STEP = 16


def numbered_frames(count: int, height: int = 32, width: int = 32) -> np.ndarray:
    """uint8 (count, height, width, 3): frame i encodes i (count <= 256)."""
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        frames[i, :, : width // 2] = (i % _STEP) * _STEP + _STEP // 2
        frames[i, :, width // 2:] = (i // _STEP) * _STEP + _STEP // 2
    return frames


def frame_numbers(frames: np.ndarray) -> List[int]:
    """The indices numbered frames encode (frames (T, H, W, 3), possibly resized; the halves' inner parts)."""
    frames = np.asarray(frames, dtype=np.float64)
    w = frames.shape[2]
    margin = max(1, w // 8)
    low = frames[:, :, margin: w // 2 - margin].mean(axis=(1, 2, 3))
    high = frames[:, :, w // 2 + margin: w - margin].mean(axis=(1, 2, 3))
    return [int(round((lo - _STEP // 2) / _STEP)) + _STEP * int(round((hi - _STEP // 2) / _STEP))
            for lo, hi in zip(low, high)]


def smooth_frames(count, height, width, seed=0):
    """Random but smooth pictures (what a codec keeps well): a few random low-frequency waves per colour channel,
    drifting from frame to frame."""
    rng = np.random.RandomState(seed)
    t, y, x = np.meshgrid(np.arange(count), np.arange(height) / height, np.arange(width) / width, indexing="ij")
    frames = np.full((count, height, width, 3), 128.0)
    for c in range(3):
        for _ in range(3):
            fy, fx = rng.uniform(-1.5, 1.5, size=2)
            frames[..., c] += rng.uniform(10, 35) * np.sin(2 * np.pi * (fy * y + fx * x + 0.05 * t) + rng.uniform(0, 7))
    return np.clip(frames, 0, 255).astype(np.uint8)


def make_annotation(rng: np.random.RandomState, frame_dir: str, label: int, persons: int = 2, frames: int = 12,
                    img_shape=(48, 64), joints: int = 17, missing: float = 0.05) -> Dict:
    """One PoseC3D annotation: persons standing somewhere in the image, a few joints missing (0, score 0)."""
    h, w = img_shape
    centre = rng.uniform(0.3, 0.7, size=(persons, 1, 1, 2)) * np.array([w, h])
    size = rng.uniform(0.15, 0.4, size=(persons, 1, 1, 2)) * np.array([w, h])
    kp = centre + (rng.rand(persons, frames, joints, 2) - 0.5) * size
    score = rng.uniform(0.2, 1.0, size=(persons, frames, joints))
    gone = rng.rand(persons, frames, joints) < missing
    kp[gone] = 0
    score[gone] = 0
    return {"frame_dir": frame_dir, "label": label, "img_shape": (h, w), "original_shape": (h, w),
            "total_frames": frames, "keypoint": kp.astype(np.float32), "keypoint_score": score.astype(np.float32)}


def write_pickle(path: Path, data, protocol: int = 4) -> Path:
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return path


def write_numbered_dataset(root: Path, lengths: Sequence[int], img_shape=(32, 32), persons: int = 2,
                           seed: int = 0, frames: bool = False) -> Dict[str, str]:
    """Annotations (split 'all') and one numbered video (or JPEG folder) per clip, clip i of lengths[i] frames.
    Returns 'ann_file', 'video_root' / 'frame_root', 'frame_dirs'."""
    from epamx.data import write_frame_folder

    rng = np.random.RandomState(seed)
    media = root / ("frames" if frames else "videos")
    media.mkdir(parents=True, exist_ok=True)
    anns = []
    for i, length in enumerate(lengths):
        frame_dir = f"clip{i:02d}"
        anns.append(make_annotation(rng, frame_dir, i % 3, persons, length, img_shape))
        pictures = numbered_frames(length, *img_shape)
        if frames:
            write_frame_folder(media / frame_dir, pictures)
        else:
            write_video(media / f"{frame_dir}.mp4", pictures)
    ann_file = write_pickle(root / "ann.pkl", {"split": {"all": [a["frame_dir"] for a in anns]}, "annotations": anns})
    return {"ann_file": str(ann_file), ("frame_root" if frames else "video_root"): str(media),
            "frame_dirs": [a["frame_dir"] for a in anns]}
