"""The MediaPipe Pose adapter: its 33 landmarks -> COCO-17 (which landmark is which joint, pixels, visibility as the
score) and the PoseEstimator output format, through MediaPipe itself where it is installed (CI installs the `pose`
extra)."""
from types import SimpleNamespace

import numpy as np
import pytest

from epamx.pose.mediapipe_pose import MEDIAPIPE_TO_COCO17, landmarks_to_coco17

mediapipe = pytest.importorskip("mediapipe", reason="needs the `pose` extra (mediapipe), which CI installs")

# BlazePose's landmark names (mediapipe.solutions.pose.PoseLandmark) that each COCO-17 joint must come from.
COCO17_FROM = ("NOSE", "LEFT_EYE", "RIGHT_EYE", "LEFT_EAR", "RIGHT_EAR", "LEFT_SHOULDER", "RIGHT_SHOULDER",
               "LEFT_ELBOW", "RIGHT_ELBOW", "LEFT_WRIST", "RIGHT_WRIST", "LEFT_HIP", "RIGHT_HIP", "LEFT_KNEE",
               "RIGHT_KNEE", "LEFT_ANKLE", "RIGHT_ANKLE")


def fake_landmarks(offset=0.0):
    """33 landmarks where landmark i sits at (i / 40, i / 50) + offset with visibility i / 40 (one above 1)."""
    marks = [SimpleNamespace(x=i / 40 + offset, y=i / 50 + offset, z=0.0, visibility=i / 40) for i in range(33)]
    marks[28].visibility = 1.3
    return marks


def test_the_mapping_is_mediapipes_own_landmark_names():
    from mediapipe.python.solutions.pose import PoseLandmark

    assert MEDIAPIPE_TO_COCO17 == tuple(int(PoseLandmark[name]) for name in COCO17_FROM)


def test_landmarks_become_coco17_pixels_and_scores():
    kp, score = landmarks_to_coco17(fake_landmarks(), height=100, width=200)
    idx = np.array(MEDIAPIPE_TO_COCO17)
    assert kp.dtype == score.dtype == np.float32 and kp.shape == (17, 2) and score.shape == (17,)
    np.testing.assert_allclose(kp[:, 0], idx / 40 * 200, rtol=1e-6)
    np.testing.assert_allclose(kp[:, 1], idx / 50 * 100, rtol=1e-6)
    np.testing.assert_allclose(score[:-1], idx[:-1] / 40, rtol=1e-6)
    assert score[-1] == 1.0  # right ankle (landmark 28): clipped to [0, 1]
    kp, score = landmarks_to_coco17(None, 100, 200)
    assert not kp.any() and not score.any()


class FakeSolution:
    """Stands for mediapipe's Pose object: every other frame a person (landmarks moving with the frame index)."""

    def __init__(self):
        self.calls = 0

    def process(self, frame):
        assert frame.dtype == np.uint8 and frame.flags["C_CONTIGUOUS"] and frame.shape == (30, 40, 3)
        self.calls += 1
        found = SimpleNamespace(landmark=fake_landmarks(self.calls / 100)) if self.calls % 2 else None
        return SimpleNamespace(pose_landmarks=found)

    def close(self):
        pass


def test_the_adapter_output_format():
    from epamx.pose.mediapipe_pose import MediaPipePose

    estimator = MediaPipePose()
    estimator._pose = FakeSolution()
    frames = np.zeros((5, 30, 40, 3), np.uint8)[:, :, :, ::-1]  # not contiguous: the adapter makes it so
    kp, score = estimator.estimate(frames)
    assert kp.shape == (1, 5, 17, 2) and score.shape == (1, 5, 17) and kp.dtype == score.dtype == np.float32
    assert score[0, 1::2].max() == 0 and not kp[0, 1::2].any()  # frames without a person: zeros
    np.testing.assert_allclose(kp[0, 2, 0], ((0 / 40 + 0.03) * 40, (0 / 50 + 0.03) * 30), rtol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        estimator.estimate(frames.astype(np.float32))


def test_mediapipe_itself_on_frames_without_anyone(tmp_path):
    """The real model (model_complexity=1, in the wheel: no download) on an empty scene: nobody, scores 0, and
    tracking state forgotten between videos."""
    from epamx.data import write_video
    from epamx.pose import video_annotation
    from epamx.pose.mediapipe_pose import MediaPipePose

    frames = np.full((70, 64, 96, 3), 90, np.uint8)  # more frames than one chunk
    frames[:, 20:40, 30:60] = 200
    write_video(tmp_path / "empty_room.mp4", frames)
    estimator = MediaPipePose()
    try:
        for _ in range(2):
            ann = video_annotation(tmp_path / "empty_room.mp4", estimator)
            assert ann["keypoint"].shape == (1, 70, 17, 2) and ann["keypoint_score"].shape == (1, 70, 17)
            assert ann["img_shape"] == (64, 96) and ann["total_frames"] == 70
            assert not ann["keypoint_score"].any()
    finally:
        estimator.close()


def drawn_person(frames: int = 12) -> tuple:
    """A cartoon person facing the camera (head, shirt, arms waving, legs), and where its joints are drawn: the nose
    (head centre), shoulders, wrists (the hands) and ankles (the feet), per frame, in the person's own left/right."""
    from PIL import Image, ImageDraw

    pictures, joints = [], []
    for t in range(frames):
        img = Image.new("RGB", (640, 480), (200, 205, 210))
        d = ImageDraw.Draw(img)
        cx, a = 320 + int(10 * np.sin(t / 8)), int(40 * np.sin(t / 5))
        skin, shirt, pants = (224, 172, 140), (40, 70, 160), (50, 50, 60)
        d.ellipse([cx - 28, 60, cx + 28, 130], fill=skin)
        d.ellipse([cx - 14, 85, cx - 6, 93], fill=(40, 30, 30))
        d.ellipse([cx + 6, 85, cx + 14, 93], fill=(40, 30, 30))
        d.rectangle([cx - 10, 128, cx + 10, 145], fill=skin)
        d.polygon([(cx - 60, 145), (cx + 60, 145), (cx + 45, 290), (cx - 45, 290)], fill=shirt)
        d.line([(cx - 55, 150), (cx - 95, 220), (cx - 100, 290 - a)], fill=shirt, width=26)
        d.line([(cx + 55, 150), (cx + 95, 220), (cx + 100, 290 + a)], fill=shirt, width=26)
        d.ellipse([cx - 112, 280 - a, cx - 88, 305 - a], fill=skin)
        d.ellipse([cx + 88, 280 + a, cx + 112, 305 + a], fill=skin)
        d.line([(cx - 25, 290), (cx - 35, 380), (cx - 38, 460)], fill=pants, width=32)
        d.line([(cx + 25, 290), (cx + 35, 380), (cx + 38, 460)], fill=pants, width=32)
        pictures.append(np.asarray(img))
        # facing the camera, the person's left is the image's right
        joints.append({0: (cx, 95), 5: (cx + 55, 150), 6: (cx - 55, 150), 9: (cx + 100, 292 + a),
                       10: (cx - 100, 292 - a), 15: (cx + 38, 455), 16: (cx - 38, 455)})
    return np.stack(pictures), joints


def test_mediapipe_finds_a_drawn_person_and_its_joints_land_on_it():
    """The real model on a cartoon person: found in most frames, each COCO-17 joint where that body part
    is drawn (head, shoulders, hands within 35 px in a 640x480 frame; feet low), left and right the right way
    round."""
    from epamx.pose.mediapipe_pose import MediaPipePose

    frames, joints = drawn_person()
    estimator = MediaPipePose()
    try:
        kp, score = estimator.estimate(frames)
    finally:
        estimator.close()
    found = score[0].max(-1) > 0.5
    assert found.sum() >= len(frames) // 2  # MediaPipe may need a few frames to lock on
    for t in np.flatnonzero(found):
        for joint in (0, 5, 6, 9, 10):
            x, y = joints[t][joint]
            assert np.hypot(*(kp[0, t, joint] - (x, y))) < 35, (t, joint, kp[0, t, joint], (x, y))
        assert score[0, t, [0, 5, 6, 9, 10]].min() > 0.5
        # the feet, harder to place for a cartoon: low in the frame, the left one on the image's right
        assert kp[0, t, 15, 1] > 380 and kp[0, t, 16, 1] > 380 and kp[0, t, 15, 0] > kp[0, t, 16, 0]
