"""The worker-side steps of the paper's pipeline, as small pure functions on NumPy arrays.

What runs here is what must run per clip on the CPU: sampling frame indices, choosing persons, the persons' box
for cropping raw RGB frames, cropping/resizing those frames (uint8), and the pose-only pipeline's random keypoint
crop (a few hundred coordinates). Everything per-pixel on floats (the multimodal pipeline's keypoint crop and
rescale, flipping, heatmaps, normalisation) runs batched on the training device (epamx.data.BatchTransform).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

__all__ = ["compact_box", "crop_resize_frames", "is_precropped", "person_box", "posec3d_keypoints", "random_resized_crop",
           "select_persons"]

# Frames whose aspect ratio is within this of the annotation image's are that image, scaled.
_ASPECT_TOLERANCE = 0.02


def compact_box(keypoint: np.ndarray, img_shape: Tuple[int, int], padding: float = 0.25, threshold: float = 10,
                hw_ratio: float = 1.0, allow_imgpad: bool = False) -> Tuple[int, int, int, int]:
    """The persons' box (x0, y0, x1, y1) in pixels, as the authors' MMCompact / PoseCompact compute it.

    keypoint: (M, T, V, 2) image pixels, over whichever frames the box should cover (the whole video for the
    offline RGB crop; the sampled frames for the online keypoint crop). NaN counts as missing (set to 0 first);
    zeros are missing. The box of the non-zero coordinates is grown by ``padding`` about its centre, made
    ``hw_ratio`` (height / width) by growing the shorter side, clipped to the image unless ``allow_imgpad``, and
    truncated to ints. A box narrower or shorter than ``threshold`` pixels (or no valid coordinate) means the
    whole image.
    """
    h, w = img_shape
    kp = np.nan_to_num(np.asarray(keypoint, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    x, y = kp[..., 0], kp[..., 1]
    xs, ys = x[x != 0], y[y != 0]
    if xs.size == 0 or ys.size == 0:
        return 0, 0, w, h
    min_x, max_x, min_y, max_y = xs.min(), xs.max(), ys.min(), ys.max()
    if max_x - min_x < threshold or max_y - min_y < threshold:
        return 0, 0, w, h
    # The authors ran NumPy 1.x: the extremes' sums and differences are float32 scalars, and dividing one by a
    # Python int goes to float64 (NumPy 2 stays in float32, which now and then moves a corner by a pixel).
    center = (float(max_x + min_x) / 2, float(max_y + min_y) / 2)
    half_w = float(max_x - min_x) / 2 * (1 + padding)
    half_h = float(max_y - min_y) / 2 * (1 + padding)
    if hw_ratio is not None:
        half_h = max(hw_ratio * half_w, half_h)
        half_w = max(1 / hw_ratio * half_h, half_w)
    x0, x1 = center[0] - half_w, center[0] + half_w
    y0, y1 = center[1] - half_h, center[1] + half_h
    if not allow_imgpad:
        x0, y0 = max(0.0, x0), max(0.0, y0)
        x1, y1 = min(float(w), x1), min(float(h), y1)
    return int(x0), int(y0), int(x1), int(y1)


def random_resized_crop(rng: np.random.RandomState, img_shape: Tuple[int, int], area_range=(0.56, 1.0),
                        aspect_range=(3 / 4, 4 / 3), max_attempts: int = 10) -> Tuple[int, int, int, int]:
    """A random box (x0, y0, x1, y1) of an image of ``img_shape`` (h, w), as mmaction2's RandomResizedCrop draws it:
    ``max_attempts`` (area fraction, log-uniform aspect ratio) candidates, the first that fits is placed at a random
    integer offset; if none fits, the largest centred square."""
    h, w = img_shape
    area = h * w
    ratios = np.exp(rng.uniform(np.log(aspect_range[0]), np.log(aspect_range[1]), size=max_attempts))
    areas = rng.uniform(area_range[0], area_range[1], size=max_attempts) * area
    widths = np.round(np.sqrt(areas * ratios)).astype(np.int32)
    heights = np.round(np.sqrt(areas / ratios)).astype(np.int32)
    for cw, ch in zip(widths, heights):
        if ch <= h and cw <= w:
            x0 = int(rng.randint(0, w - cw + 1))
            y0 = int(rng.randint(0, h - ch + 1))
            return x0, y0, x0 + int(cw), y0 + int(ch)
    side = min(h, w)
    x0, y0 = (w - side) // 2, (h - side) // 2
    return x0, y0, x0 + side, y0 + side


def posec3d_keypoints(keypoint: np.ndarray, img_shape: Tuple[int, int], size: int,
                      rng: Optional[np.random.RandomState] = None, short_side: int = 64,
                      area_range=(0.56, 1.0)) -> np.ndarray:
    """The pose-only pipeline's keypoint geometry (PoseC3D's X3D recipe, the authors' dataPrep.py): keypoints
    (M, T, V, 2) in the pixels of an image of ``img_shape`` (h, w) -> keypoints in the pixels of a ``size`` square.

    PoseCompact (padding 0.25, threshold 10, hw_ratio 1, allow_imgpad=True: the box may extend beyond the image);
    with ``rng`` (training) Resize to a short side of ``short_side`` -> RandomResizedCrop(``area_range``) -> Resize
    to ``size``; without (testing) Resize to ``size`` directly. Scale factors are float32, as mmaction2's Resize.
    Zeros mean "missing" (NaN is read as missing too): they stay 0 and draw nothing (their score is 0).
    """
    kp = np.nan_to_num(np.asarray(keypoint, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    missing = kp == 0
    x0, y0, x1, y1 = compact_box(kp, img_shape, allow_imgpad=True)
    kp = np.where(missing, kp, kp - np.array([x0, y0], dtype=np.float32))
    h, w = y1 - y0, x1 - x0
    if rng is not None:
        scale = short_side / min(h, w)
        new_w, new_h = int(w * scale + 0.5), int(h * scale + 0.5)
        kp = kp * np.array([new_w / w, new_h / h], dtype=np.float32)
        cx0, cy0, cx1, cy1 = random_resized_crop(rng, (new_h, new_w), area_range)
        kp = np.where(missing, kp, kp - np.array([cx0, cy0], dtype=np.float32))
        h, w = cy1 - cy0, cx1 - cx0
    kp = kp * np.array([size / w, size / h], dtype=np.float32)
    return np.where(missing, np.float32(0), kp).astype(np.float32)


def person_box(keypoint: np.ndarray, img_shape: Tuple[int, int], frame_shape: Tuple[int, int]
               ) -> Tuple[int, int, int, int]:
    """The authors' offline crop box (``compact_box`` of ``keypoint`` (M, T, V, 2), every frame of the video, in
    the annotation's ``img_shape`` (h, w)), scaled to frames of ``frame_shape`` (h, w): the authors halved NTU's
    1080p frames and the box with them. Raises ValueError when the frames are not the annotation's image scaled
    (another aspect ratio): the box would not be square in them, and the crop a squash."""
    h, w = img_shape
    fh, fw = frame_shape
    if abs((fw / fh) / (w / h) - 1) > _ASPECT_TOLERANCE:
        raise ValueError(f"the frames are {fh}x{fw} (h x w), not the annotation's image ({h}x{w}) scaled: its "
                         f"keypoints cannot say where the persons are in them")
    x0, y0, x1, y1 = compact_box(keypoint, (h, w))
    sx, sy = fw / w, fh / h
    return int(x0 * sx), int(y0 * sy), int(x1 * sx), int(y1 * sy)


def is_precropped(frame_shape: Tuple[int, int]) -> bool:
    """Whether frames of ``frame_shape`` (h, w) can be pre-cropped ones: square (the persons' box is; resizing a
    square frame to the model's square input changes no proportions). Any other frame is raw, and only a crop to
    the persons (``person_box``) fits it to the model without squashing it."""
    return frame_shape[0] == frame_shape[1]


def select_persons(keypoint: np.ndarray, score: np.ndarray, max_persons: int) -> Tuple[np.ndarray, np.ndarray]:
    """Exactly ``max_persons`` persons: the highest total scores first when there are more (ties keep file order),
    padded with absent persons (coordinates and scores 0, which draw nothing) when there are fewer, zero included."""
    m = keypoint.shape[0]
    if m > max_persons:
        order = np.argsort(-np.nan_to_num(score, nan=0.0).reshape(m, -1).sum(1), kind="stable")[:max_persons]
        order.sort()
        keypoint, score = keypoint[order], score[order]
    elif m < max_persons:
        pad = max_persons - m
        keypoint = np.concatenate([keypoint, np.zeros((pad,) + keypoint.shape[1:], keypoint.dtype)])
        score = np.concatenate([score, np.zeros((pad,) + score.shape[1:], score.dtype)])
    return keypoint, score


def crop_resize_frames(frames: np.ndarray, box: Tuple[int, int, int, int], size: int) -> np.ndarray:
    """uint8 (T, H, W, 3) frames -> the box (x0, y0, x1, y1) of each, resized to (size, size) (bilinear), uint8."""
    from PIL import Image

    x0, y0, x1, y1 = box
    h, w = frames.shape[1:3]
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        x0, y0, x1, y1 = 0, 0, w, h
    if (x0, y0, x1, y1) == (0, 0, w, h) and (h, w) == (size, size):
        return frames
    out = np.empty((len(frames), size, size, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        img = Image.fromarray(frame[y0:y1, x0:x1])
        out[i] = np.asarray(img.resize((size, size), Image.BILINEAR))
    return out
