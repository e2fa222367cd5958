"""Long videos window by window (`predict --video X --window S --stride S`): where the windows fall (the last one
ends at or before the video's end), the timeline files, streaming (the decoder runs at most a few chunks ahead of
the estimator and only the open windows' sampled frames are held), and bad options as one line."""
import json

import pytest
from PIL import Image

from epamx.cli import main
from epamx.config import load_config
from epamx.data import decoding
from epamx.errors import ConfigError
from epamx.inference import timeline
from epamx.inference.timeline import WindowPlan, check_windows, predict_timeline
from epamx.models import build_model
from pose_fakes import CLASSES, TABLE_ENV, TINY, TableEstimator, raw_video, tiny_checkpoint, write_table
from testkit import one_thread


@pytest.fixture
def videos(tmp_path, monkeypatch):
    """Raw 48x64 videos at 30 frames/s: 45 frames (1.5 s), 50 frames (1.67 s) and 150 frames (5 s), the estimator
    table that finds their persons, and a tiny EPAM-Net checkpoint."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EPAMX_DEBUG", raising=False)
    found = {}
    for name, frames in (("three", 45), ("tail", 50), ("long", 150)):
        path = tmp_path / f"{name}.mp4"
        found[str(path)] = raw_video(path, seed=frames, frames=frames)
    monkeypatch.setenv(TABLE_ENV, str(write_table(tmp_path / "table.npz", found)))
    with one_thread():
        yield {"dir": tmp_path, "checkpoint": tiny_checkpoint(tmp_path / "final.pt")}


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run(videos, name, *extra):
    return ["predict", "--checkpoint", videos["checkpoint"], "--config", "embedded", *TINY, "--video",
            videos["dir"] / f"{name}.mp4", "--estimator", "pose_fakes:TableEstimator", "--top-k", 2, *extra]


def test_window_plan():
    plan = WindowPlan(30.0, window=0.5, stride=0.2, clip_len=6, rgb_every=3)
    assert (plan.length, plan.stride) == (15, 6)
    assert [plan.start(k) for k in range(3)] == [0, 6, 12]
    assert plan.count(14) == 0 and plan.count(15) == 1 and plan.count(45) == 6 and plan.count(50) == 6
    assert list(plan.windows_of(0)) == [0] and list(plan.windows_of(14)) == [0, 1, 2] and list(plan.windows_of(15)) == [1, 2]
    rgb = sorted(plan.rgb_offsets)
    assert len(rgb) == 2 and all(plan.rgb_needed(6 + o) for o in rgb)


def test_three_windows_and_the_files(videos, capsys):
    rc, out, err = cli(capsys, *run(videos, "three", "--window", 0.5, "--stride", 0.5, "--out", "tl/"))
    assert rc == 0, err
    lines = [json.loads(line) for line in (videos["dir"] / "tl" / "three.timeline.jsonl").read_text().splitlines()]
    assert [(w["start"], w["end"]) for w in lines] == [(0.0, 0.5), (0.5, 1.0), (1.0, 1.5)]
    assert all(len(w["top"]) == 2 and w["top"][0][0] in CLASSES and w["person_detected"] for w in lines)
    with Image.open(videos["dir"] / "tl" / "three.timeline.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    shown = [line for line in out.splitlines() if " s: " in line]
    assert len(shown) == 3 and shown[0].strip().startswith("0.00-0.50 s: ")
    assert "3 windows; 0.00 s after the last one" in out


def test_the_last_partial_window_is_not_classified(videos, capsys):
    """50 frames, windows of 15 every 15: three windows, the 5 frames after the third are reported, not classified."""
    rc, out, err = cli(capsys, *run(videos, "tail", "--window", 0.5, "--out", "tail", "--json"))
    assert rc == 0, err
    result = json.loads(out)
    assert [(w["start_frame"], w["end_frame"]) for w in result["windows"]] == [(0, 15), (15, 30), (30, 45)]
    assert result["frames"] == 50 and result["uncovered"] == pytest.approx(5 / 30, abs=1e-3)
    assert (videos["dir"] / "tail.jsonl").is_file() and (videos["dir"] / "tail.png").is_file()
    rc, out, err = cli(capsys, *run(videos, "tail", "--window", 0.5, "--stride", 0.2, "--out", "overlap", "--json"))
    assert [w["start_frame"] for w in json.loads(out)["windows"]] == [0, 6, 12, 18, 24, 30]


def test_one_window_over_the_whole_video_is_predict_video(videos, capsys):
    rc, out, err = cli(capsys, *run(videos, "three", "--json"))
    (whole,) = json.loads(out)["clips"]
    rc, out, err = cli(capsys, *run(videos, "three", "--window", 1.5, "--json"))
    (window,) = json.loads(out)["windows"]
    assert window["top"] == whole["top"]


def test_streaming(videos, monkeypatch):
    """The decoder runs at most its queue (plus the chunk in hand) ahead of the estimator, and only the open windows'
    RGB frames are held: a bound independent of the video's length."""
    decoded = [0]
    real = decoding.decode_video

    def counting(path):
        for item in real(path):
            decoded[0] += 1
            yield item

    ahead = []

    class Watching(TableEstimator):
        def reset(self):
            super().reset()
            self.seen = 0

        def estimate(self, frames):
            self.seen += len(frames)
            ahead.append(decoded[0] - self.seen)
            return super().estimate(frames)

    monkeypatch.setattr(decoding, "decode_video", counting)
    cfg = load_config("embedded", TINY)
    model = build_model("epamnet", len(CLASSES), 17).eval()
    result = predict_timeline(model, cfg, CLASSES, "epamnet", videos["dir"] / "long.mp4", window=1.0, stride=0.5,
                              estimator=Watching)
    assert decoded[0] == result["frames"] == 150 and len(result["windows"]) == 9
    assert len(ahead) == 150 // timeline.CHUNK + 1
    assert max(ahead) <= (timeline._QUEUE + 2) * timeline.CHUNK
    rgb_per_window = cfg.data.clip_len // cfg.data.rgb_every
    assert 0 < result["peak_frames_held"] <= 3 * rgb_per_window


@pytest.mark.parametrize("options, named", [
    (["--window", 0], "--window"), (["--window", -1], "--window"), (["--window", 1, "--stride", 0], "--stride"),
    (["--window", 1, "--stride", -0.5], "--stride"), (["--window", 1, "--stride", 1.5], "--stride"),
    (["--stride", 1], "--window"), (["--window", 2], "--window 2 s is longer than the video"),
])
def test_bad_windows_are_one_line(videos, capsys, options, named):
    rc, out, err = cli(capsys, *run(videos, "three", *options))
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("epamx predict: error: "), err
    assert named in err, err


def test_check_windows():
    assert check_windows(2.0, None) == (2.0, 2.0)
    with pytest.raises(ConfigError, match="--stride"):
        check_windows(2.0, 3.0)
