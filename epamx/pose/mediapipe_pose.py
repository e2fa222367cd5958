"""MediaPipe Pose behind epamx's PoseEstimator: one person per frame, tracked from frame to frame.

MediaPipe's 33 BlazePose landmarks contain COCO-17's joints (``MEDIAPIPE_TO_COCO17``); a landmark's visibility is
the joint's score. It finds at most one person: in a video of several, the others get no keypoints. Install with the
``pose`` extra (README: "Your own video"). model_complexity=1 is the only model inside the mediapipe 0.10 wheel
(0 and 2 are downloaded on first use, which fails offline).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np

from epamx.errors import MissingExtra
from epamx.pose.estimator import PoseEstimator

__all__ = ["MEDIAPIPE_TO_COCO17", "MediaPipePose", "landmarks_to_coco17"]

# COCO-17 joint j is MediaPipe landmark MEDIAPIPE_TO_COCO17[j]: nose, eyes (left, right), ears, shoulders, elbows,
# wrists, hips, knees, ankles.
MEDIAPIPE_TO_COCO17 = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)
_LANDMARKS = 33


def landmarks_to_coco17(landmarks: Optional[Sequence[Any]], height: int, width: int
                        ) -> Tuple[np.ndarray, np.ndarray]:
    """MediaPipe's 33 normalised landmarks of one frame (objects with x, y, visibility; None: nobody found) ->
    COCO-17 keypoints float32 (17, 2) in pixels and scores float32 (17,) (visibility, clipped to [0, 1]); nobody
    found gives zeros."""
    kp = np.zeros((len(MEDIAPIPE_TO_COCO17), 2), np.float32)
    score = np.zeros(len(MEDIAPIPE_TO_COCO17), np.float32)
    if landmarks is None:
        return kp, score
    if len(landmarks) != _LANDMARKS:
        raise ValueError(f"MediaPipe Pose gives {_LANDMARKS} landmarks per person, got {len(landmarks)}")
    for j, m in enumerate(MEDIAPIPE_TO_COCO17):
        mark = landmarks[m]
        kp[j] = (mark.x * width, mark.y * height)
        score[j] = min(max(float(mark.visibility), 0.0), 1.0)
    return kp, score


class MediaPipePose(PoseEstimator):
    """``mediapipe.solutions.pose`` in video mode (tracking): keypoints (1, T, 17, 2), scores (1, T, 17).

    Args:
        min_detection_confidence, min_tracking_confidence: MediaPipe's thresholds.
        smooth_landmarks: MediaPipe's temporal smoothing of the landmarks.
    Raises MissingExtra (an ImportError) where mediapipe is not installed.
    """

    def __init__(self, min_detection_confidence: float = 0.5, min_tracking_confidence: float = 0.5,
                 smooth_landmarks: bool = True):
        try:
            from mediapipe.python.solutions import pose
        except ImportError as e:
            raise MissingExtra(f"MediaPipe Pose needs the `pose` extra, not installed here ({e}): see the README, "
                               f"\"Your own video\"") from e
        self._solution = pose
        self._options = dict(static_image_mode=False, model_complexity=1, smooth_landmarks=smooth_landmarks,
                             enable_segmentation=False, min_detection_confidence=min_detection_confidence,
                             min_tracking_confidence=min_tracking_confidence)
        self._pose = None

    def reset(self) -> None:
        self.close()

    def estimate(self, frames: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"MediaPipePose: frames must be uint8 (T, H, W, 3) RGB, got {frames.dtype} "
                             f"{frames.shape}")
        if self._pose is None:
            self._pose = self._solution.Pose(**self._options)
        t, h, w = frames.shape[:3]
        kp = np.zeros((1, t, len(MEDIAPIPE_TO_COCO17), 2), np.float32)
        score = np.zeros((1, t, len(MEDIAPIPE_TO_COCO17)), np.float32)
        for i, frame in enumerate(frames):
            found = self._pose.process(np.ascontiguousarray(frame)).pose_landmarks
            kp[0, i], score[0, i] = landmarks_to_coco17(found.landmark if found is not None else None, h, w)
        return kp, score

    def close(self) -> None:
        if self._pose is not None:
            self._pose.close()
            self._pose = None
