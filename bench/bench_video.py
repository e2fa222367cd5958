"""From a raw 1080p video to an action on this CPU: MediaPipe Pose's keypoint extraction (frames/s) with decoding
one chunk after the other against a decoding thread feeding the estimator (epamx.data.decode_chunks), and the
end-to-end time of `epamx predict --video` (decoding, keypoints, cropping, EPAM-Net at the NTU configs' sizes: 48
pose frames at 56x56 heatmaps, 16 RGB frames at 224x224, untrained weights) on a 10-second 1080p clip: one clip
(keypoints first, then the clip's frames decoded again), and `--window 10` (decoded once, streaming, overlapped).

The video is synthetic, no download: a cartoon person (head with eyes, shirt, waving arms, legs; what MediaPipe finds
in tests/inference/test_mediapipe_pose.py) drawn at 1920x1080, 30 frames/s, H.264. Needs the `pose` extra."""
import contextlib
import io
import time

import numpy as np
import pytest
import torch

pytest.importorskip("mediapipe", reason="needs the `pose` extra (mediapipe)")

from epamx.cli import main  # noqa: E402
from epamx.data.decoding import decode_video, write_video_stream  # noqa: E402
from epamx.pose import video_annotation  # noqa: E402
from epamx.pose.estimator import check_estimate  # noqa: E402
from epamx.pose.mediapipe_pose import MediaPipePose  # noqa: E402

SECONDS, FPS, HEIGHT, WIDTH = 10, 30, 1080, 1920


def _drawn_person(t: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    k = HEIGHT / 480  # the test's 640x480 person, scaled to the frame's height
    img = Image.new("RGB", (WIDTH, HEIGHT), (200, 205, 210))
    d = ImageDraw.Draw(img)
    cx, a = WIDTH / 2 / k + 10 * np.sin(t / 8), 40 * np.sin(t / 5)

    def s(*points):
        return [v * k for v in points]

    skin, shirt, pants = (224, 172, 140), (40, 70, 160), (50, 50, 60)
    d.ellipse(s(cx - 28, 60, cx + 28, 130), fill=skin)
    d.ellipse(s(cx - 14, 85, cx - 6, 93), fill=(40, 30, 30))
    d.ellipse(s(cx + 6, 85, cx + 14, 93), fill=(40, 30, 30))
    d.rectangle(s(cx - 10, 128, cx + 10, 145), fill=skin)
    d.polygon(s(cx - 60, 145, cx + 60, 145, cx + 45, 290, cx - 45, 290), fill=shirt)
    d.line(s(cx - 55, 150, cx - 95, 220, cx - 100, 290 - a), fill=shirt, width=int(26 * k))
    d.line(s(cx + 55, 150, cx + 95, 220, cx + 100, 290 + a), fill=shirt, width=int(26 * k))
    d.ellipse(s(cx - 112, 280 - a, cx - 88, 305 - a), fill=skin)
    d.ellipse(s(cx + 88, 280 + a, cx + 112, 305 + a), fill=skin)
    d.line(s(cx - 25, 290, cx - 35, 380, cx - 38, 460), fill=pants, width=int(32 * k))
    d.line(s(cx + 25, 290, cx + 35, 380, cx + 38, 460), fill=pants, width=int(32 * k))
    return np.asarray(img)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "person_1080p.mp4"
    write_video_stream(path, (_drawn_person(t) for t in range(SECONDS * FPS)), fps=FPS, crf=23)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from epamx.models import build_model
    from epamx.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    meta = {"mode": "epamnet", "num_classes": 60, "pose_channels": 17}
    path = tmp_path_factory.mktemp("ckpt") / "final.pt"
    return save_checkpoint({"meta": meta, "model": build_model("epamnet", 60, 17).state_dict()}, path)


def _one_after_the_other(path, estimator):
    """Decode a chunk, then estimate it, then decode the next: no overlap."""
    estimator.reset()
    chunk, found = [], 0
    for frame, _ in decode_video(path):
        chunk.append(frame.to_ndarray(format="rgb24"))
        if len(chunk) == 16:
            kp, sc = check_estimate(*estimator.estimate(np.stack(chunk)), len(chunk), 17, "MediaPipePose")
            found += int((sc.max(-1) > 0.5).sum())
            chunk = []
    return found


def test_keypoint_extraction(compare, record_metric, video):
    estimator = MediaPipePose()
    frames = SECONDS * FPS
    found = {}

    def sequential():
        found["sequential"] = _one_after_the_other(video, estimator)

    def overlapped():
        ann = video_annotation(video, estimator)
        found["overlapped"] = int((ann["keypoint_score"][0].max(-1) > 0.5).sum())

    case = compare("keypoints, MediaPipe Pose", f"{frames} frames 1920x1080 H.264", {
        "decode, then estimate": sequential, "decoding thread": overlapped}, device="cpu",
        baseline="decode, then estimate", repeats=2, min_rounds=1)
    estimator.close()
    for name in ("decode, then estimate", "decoding thread"):
        record_metric("frames/s", f"keypoints, {name}", f"{frames / case.seconds(name):.1f}")
    record_metric("frames with a person found (score > 0.5)", "keypoints", f"{found['overlapped']} of {frames}")
    started = time.perf_counter()
    MediaPipePose().estimate(_drawn_person(0)[None])
    record_metric("seconds", "a new MediaPipePose and its first frame", f"{time.perf_counter() - started:.2f}")


def test_predict_video_end_to_end(compare, record_metric, video, checkpoint, tmp_path):
    base = ["predict", "--checkpoint", str(checkpoint), "--config", "ntu60_xsub", "--video", str(video),
            "--device", "cpu"]

    def run(*extra):
        def call():
            with contextlib.redirect_stdout(io.StringIO()) as out:
                assert main(base + list(extra)) == 0
            return out.getvalue()
        return call

    case = compare("predict --video, end to end", f"{SECONDS} s of 1920x1080 at {FPS} frames/s, NTU sizes", {
        "one clip": run(), "--window 10 (streaming)": run("--window", str(SECONDS), "--out", str(tmp_path / "t"))},
        device="cpu", baseline="one clip", repeats=2, min_rounds=1)
    for name in ("one clip", "--window 10 (streaming)"):
        record_metric("seconds (goal <= 15)", f"predict --video, {name}", f"{case.seconds(name):.2f}")
