"""Which frames of a video EPAM-Net sees: 48 pose frames sampled uniformly (PoseC3D's UniformSampleFrames) and,
for the RGB stream, every third of them (16 frames), as the authors' MMUniformSampleFrames does.

Uniform sampling splits the video into ``clip_len`` equal segments and takes one frame from each:
- at least 2 * clip_len frames: a random frame of each segment [i * T // clip_len, (i + 1) * T // clip_len);
- clip_len to 2 * clip_len - 1 frames: consecutive frames with T - clip_len randomly chosen single skips;
- fewer than clip_len frames: clip_len consecutive indices from a start, wrapped modulo T (a loop).
Test mode draws from a fresh ``numpy.random.RandomState(seed)`` (seed 255), so every evaluation sees the same
frames; this reproduces the original's draws, which seed NumPy's global generator with the same seed (epamx leaves
the global generator alone). Train mode draws from the generator it is given.

The authors' code subclasses mmaction2's UniformSampleFrames, which has no ``p_interval``; pyskl's version first
draws a random fraction of the video to sample from (``p_interval``), even when the interval is (1, 1), which
consumes one random number and so yields different frames in test mode. ``p_interval=None`` (the default) is the
authors' variant; a pair (or a number) selects pyskl's.
"""
from __future__ import annotations

from typing import Tuple, Union

import numpy as np

__all__ = ["uniform_sample_frames", "rgb_frame_indices"]


def _one_clip(rng, num_frames: int, clip_len: int, test_mode: bool, clip: int,
              num_clips: int) -> np.ndarray:
    if num_frames < clip_len:
        if test_mode:
            start = clip if num_frames < num_clips else clip * num_frames // num_clips
        else:
            start = rng.randint(0, num_frames)
        return np.arange(start, start + clip_len)
    if num_frames < 2 * clip_len:
        skips = rng.choice(clip_len + 1, num_frames - clip_len, replace=False)
        offset = np.zeros(clip_len + 1, dtype=np.int64)
        offset[skips] = 1
        return np.arange(clip_len) + np.cumsum(offset)[:-1]
    bounds = np.array([i * num_frames // clip_len for i in range(clip_len + 1)])
    return bounds[:clip_len] + rng.randint(np.diff(bounds))


def uniform_sample_frames(total_frames: int, clip_len: int = 48, test_mode: bool = True, seed: int = 255,
                          rng: Union[np.random.RandomState, int, None] = None, num_clips: int = 1,
                          p_interval: Union[float, Tuple[float, float], None] = None) -> np.ndarray:
    """Indices (num_clips * clip_len,) int64 into a video of ``total_frames`` frames (see the module docstring).

    Args:
        total_frames: frames in the video (>= 1).
        clip_len: frames per clip (48 for EPAM-Net's pose stream).
        test_mode: deterministic sampling from ``RandomState(seed)``; otherwise random, from ``rng``.
        seed: the test-mode seed (255, as PoseC3D).
        rng: train mode's generator: a ``numpy.random.RandomState``, a seed for a new one, or None (NumPy's global
            generator, as the original).
        num_clips: clips to sample (concatenated).
        p_interval: None for the authors' sampler; a fraction range (lo, hi) (or one number) for pyskl's, which
            samples from a random ``int(ratio * total_frames)``-frame stretch of the video.
    """
    if total_frames < 1 or clip_len < 1 or num_clips < 1:
        raise ValueError(f"uniform_sample_frames: total_frames, clip_len and num_clips must be >= 1, got "
                         f"{total_frames}, {clip_len}, {num_clips}")
    if test_mode:
        generator = np.random.RandomState(seed)
    elif rng is None:
        generator = np.random  # its module functions draw from NumPy's global RandomState, as the original
    elif isinstance(rng, np.random.RandomState):
        generator = rng
    else:
        generator = np.random.RandomState(rng)
    if p_interval is not None and not isinstance(p_interval, tuple):
        p_interval = (float(p_interval), float(p_interval))
    if p_interval is None and not test_mode and num_clips != 1:
        raise ValueError("uniform_sample_frames: the authors' sampler (p_interval=None) samples one clip in train "
                         f"mode, got num_clips={num_clips}")
    clips = []
    for clip in range(num_clips):
        num_frames, offset = total_frames, 0
        if p_interval is not None:
            ratio = generator.rand() * (p_interval[1] - p_interval[0]) + p_interval[0]
            num_frames = int(ratio * total_frames)
            offset = generator.randint(total_frames - num_frames + 1)
        clips.append(_one_clip(generator, num_frames, clip_len, test_mode, clip, num_clips) + offset)
    return np.mod(np.concatenate(clips), total_frames).astype(np.int64)


def rgb_frame_indices(pose_indices: np.ndarray, every: int = 3) -> np.ndarray:
    """The RGB stream's frames: every ``every``-th pose frame index, starting with the first (48 -> 16)."""
    return np.asarray(pose_indices)[::every].astype(np.int64)
