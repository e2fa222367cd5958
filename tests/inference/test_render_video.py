"""`render --video` writes an MP4 to watch: every frame of the video at its size, drawn over (skeleton, attention,
bars, caption), beside the PNG sheet; with --keypoints or the estimator."""
import numpy as np
import pytest

from epamx.cli import main
from epamx.data.decoding import decode_video
from pose_fakes import TABLE_ENV, TINY, raw_video, tiny_checkpoint, write_table
from testkit import one_thread


@pytest.fixture
def clip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EPAMX_DEBUG", raising=False)
    video = tmp_path / "person.mp4"
    kp, scores = raw_video(video, seed=5, frames=20)
    np.savez(tmp_path / "person.npz", keypoint=kp, keypoint_score=scores)
    monkeypatch.setenv(TABLE_ENV, str(write_table(tmp_path / "table.npz", {str(video): (kp, scores)})))
    with one_thread():
        yield {"video": video, "keypoints": tmp_path / "person.npz", "checkpoint": tiny_checkpoint(tmp_path / "f.pt")}


def frames_of(path):
    return np.stack([f.to_ndarray(format="rgb24") for f, _ in decode_video(path)])


@pytest.mark.parametrize("source", ["keypoints", "estimator"])
def test_render_video_writes_an_mp4_of_every_frame(clip, capsys, tmp_path, source):
    given = ["--keypoints", clip["keypoints"]] if source == "keypoints" else ["--estimator",
                                                                              "pose_fakes:TableEstimator"]
    rc = main([str(a) for a in ["render", "--checkpoint", clip["checkpoint"], "--config", "embedded", *TINY,
                                "--video", clip["video"], *given, "--out", tmp_path / "out"]])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.split() == [str(tmp_path / "out" / "person.png"), str(tmp_path / "out" / "person.mp4")]
    drawn, raw = frames_of(tmp_path / "out" / "person.mp4"), frames_of(clip["video"])
    assert drawn.shape == raw.shape == (20, 48, 64, 3)
    assert np.abs(drawn.astype(int) - raw).mean() > 5  # drawn over
