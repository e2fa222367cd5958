"""The pose estimator interface: RGB frames in, COCO-17 keypoints and scores out.

    class MyEstimator(PoseEstimator):
        def estimate(self, frames):            # uint8 (T, H, W, 3) RGB, consecutive frames of one video
            ...
            return keypoints, scores            # float32 (M, T, 17, 2) in the frames' pixels, (M, T, 17) in [0, 1]

``epamx.pose.extract_keypoints`` calls ``reset()`` before each video, then ``estimate`` on its frames in order, a
chunk at a time (so a long video is never held in memory whole): an estimator that tracks persons keeps its state
from one chunk to the next and forgets it in ``reset``. A frame where nobody is found has score 0 for every joint
(coordinates 0, as PoseC3D writes a missed detection).
"""
from __future__ import annotations

import abc
from typing import Callable, Tuple

import numpy as np

__all__ = ["COCO17_JOINTS", "EstimatorFactory", "PoseEstimator", "check_estimate", "load_estimator"]

COCO17_JOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                 "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                 "right_knee", "left_ankle", "right_ankle")


class PoseEstimator(abc.ABC):
    """Frames of one video in, per-person COCO-17 keypoints and scores out (see the module docstring)."""

    num_joints = len(COCO17_JOINTS)

    def reset(self) -> None:
        """A new video starts: forget any tracking state. The default has none."""

    @abc.abstractmethod
    def estimate(self, frames: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """uint8 (T, H, W, 3) RGB frames -> keypoints float32 (M, T, 17, 2) in pixels (x, y), scores float32
        (M, T, 17) in [0, 1]; M (persons) may be 0."""

    def close(self) -> None:
        """Release what the estimator holds (models, threads). The default holds nothing."""


EstimatorFactory = Callable[[], PoseEstimator]  # a PoseEstimator class, or a function (picklable) that makes one


def check_estimate(keypoints: np.ndarray, scores: np.ndarray, frames: int, joints: int, who: str
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """An estimator's output as float32 arrays, checked against the frames it was given: a wrong shape is a bug in
    the estimator, raised as ValueError naming it."""
    kp, sc = np.asarray(keypoints, dtype=np.float32), np.asarray(scores, dtype=np.float32)
    if kp.ndim != 4 or kp.shape[1:] != (frames, joints, 2) or sc.shape != kp.shape[:3]:
        raise ValueError(f"{who}: estimate() must return keypoints (M, {frames}, {joints}, 2) and scores "
                         f"(M, {frames}, {joints}) for {frames} frames, got {kp.shape} and {sc.shape}")
    return kp, sc


def load_estimator(spec: str):
    """The estimator class (or factory) ``spec`` names: "mediapipe" (MediaPipePose), or "module:attribute" for a
    PoseEstimator of one's own. Raises ValueError naming what is missing."""
    import importlib

    if spec == "mediapipe":
        from epamx.pose.mediapipe_pose import MediaPipePose

        return MediaPipePose
    module, sep, attribute = spec.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"expected 'mediapipe' or MODULE:CLASS (a PoseEstimator), got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load the estimator {spec!r}: {e}") from e
    if not callable(factory):
        raise ValueError(f"{spec!r} is not a class or a function that makes a PoseEstimator")
    return factory
