"""`epamx keypoints`: videos -> a PoseC3D annotation pickle epamx reads, with a stand-in estimator that returns each
video's true keypoints (pose_fakes.TableEstimator); parallel, resumable after a kill, bad videos named."""
import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from epamx.cli import main
from epamx.data import load_annotations
from epamx.data.annotations import safe_load_pickle
from epamx.pose import extract_keypoints, find_videos, parts_folder
from pose_fakes import SLOW_ENV, TABLE_ENV, TableEstimator, raw_video, write_table

ROOT = Path(__file__).resolve().parents[2]
ESTIMATOR = "pose_fakes:TableEstimator"


@pytest.fixture
def videos(tmp_path, monkeypatch):
    """Four raw videos in class folders (wave/a, wave/b, clap/c, squat/d), the table of their true keypoints in
    TABLE_ENV, and a fifth video, nobody/e, unknown to the estimator (no person found)."""
    truth = {}
    for seed, name in enumerate(["wave/a", "wave/b", "clap/c", "squat/d"]):
        path = tmp_path / "videos" / f"{name}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        truth[str(path)] = raw_video(path, seed, frames=10 + seed)
    (tmp_path / "videos" / "nobody").mkdir()
    raw_video(tmp_path / "videos" / "nobody" / "e.mp4", 9)
    table = write_table(tmp_path / "table.npz", truth)
    monkeypatch.setenv(TABLE_ENV, str(table))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "videos", truth, table


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_keypoints_of_a_folder_as_an_annotation_file(videos, tmp_path, capsys):
    root, truth, _ = videos
    (tmp_path / "val.txt").write_text("wave/b\nnobody/e\n")
    out = tmp_path / "ann.pkl"
    rc, stdout, err = cli(capsys, "keypoints", root, "--out", out, "--label-folders", "--split",
                          f"val={tmp_path / 'val.txt'}", "--estimator", ESTIMATOR, "--workers", 0, "--quiet")
    assert rc == 0, err
    assert stdout.startswith("keypoints of 5 videos (0 already done)") and "0 skipped" in stdout
    assert not parts_folder(out).exists()
    data = safe_load_pickle(out)
    assert data["classes"] == ["clap", "nobody", "squat", "wave"]
    assert data["split"] == {"all": ["clap/c", "nobody/e", "squat/d", "wave/a", "wave/b"], "val": ["wave/b", "nobody/e"]}
    anns = {a["frame_dir"]: a for a in load_annotations(out, num_joints=17)}  # epamx's loader reads it
    for path, (kp, scores) in truth.items():
        name = Path(path).relative_to(root).with_suffix("").as_posix()
        a = anns[name]
        np.testing.assert_array_equal(a["keypoint"], kp)
        np.testing.assert_array_equal(a["keypoint_score"], scores)
        assert a["img_shape"] == (48, 64) and tuple(a["original_shape"]) == (48, 64)
        assert a["total_frames"] == kp.shape[1] and a["label"] == data["classes"].index(name.split("/")[0])
    nobody = anns["nobody/e"]
    assert nobody["keypoint"].shape == (1, 12, 17, 2) and not nobody["keypoint_score"].any()


def test_labels_from_a_file_and_parallel_workers(videos, tmp_path):
    root, _, table = videos
    found = find_videos([root / "wave", root / "clap" / "c.mp4"])
    assert [v.frame_dir for v in found] == ["a", "b", "c"]
    from epamx.pose import labels_from_file

    (tmp_path / "labels.txt").write_text("a jump\nb.mp4 sit\nc 1\n")
    (tmp_path / "classes.txt").write_text("sit\njump\n")
    labels, classes = labels_from_file(tmp_path / "labels.txt", found, ["sit", "jump"])
    assert labels == {"a": 1, "b": 0, "c": 1} and classes == ["sit", "jump"]
    factory = functools.partial(TableEstimator, str(table))
    one = extract_keypoints(found, tmp_path / "one.pkl", factory, labels, classes, workers=1, progress=False)
    two = extract_keypoints(found, tmp_path / "two.pkl", factory, labels, classes, workers=2, progress=False)
    assert one["done"] == two["done"] == 3 and one["frames"] == 10 + 11 + 12
    a, b = load_annotations(tmp_path / "one.pkl"), load_annotations(tmp_path / "two.pkl")
    assert [x["frame_dir"] for x in a] == [x["frame_dir"] for x in b] == ["a", "b", "c"]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["keypoint"], y["keypoint"])
        assert x["label"] == y["label"]


def test_a_killed_run_resumes_with_the_videos_it_finished(videos, tmp_path, capsys):
    root, _, table = videos
    out = tmp_path / "ann.pkl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent)]),
           TABLE_ENV: str(table), SLOW_ENV: "1.0", "OMP_NUM_THREADS": "1"}
    argv = ["keypoints", str(root), "--out", str(out), "--estimator", ESTIMATOR, "--workers", "1", "--quiet"]
    process = subprocess.Popen([sys.executable, "-m", "epamx", *argv], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    parts = parts_folder(out)
    deadline = time.monotonic() + 120
    while not (parts.is_dir() and len(list(parts.glob("*.npz"))) >= 2):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no video finished in 120 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    finished = len(list(parts.glob("*.npz")))
    assert 2 <= finished < 5 and not out.exists()  # nothing half-written passes for the output
    rc, stdout, err = cli(capsys, *argv)
    assert rc == 0, err
    assert stdout.startswith(f"keypoints of {5 - finished} videos ({finished} already done)")
    resumed = load_annotations(out)
    rc, _, err = cli(capsys, *argv[:3], tmp_path / "again.pkl", *argv[4:])
    assert rc == 0, err
    for x, y in zip(resumed, load_annotations(tmp_path / "again.pkl"), strict=True):
        assert x["frame_dir"] == y["frame_dir"]
        np.testing.assert_array_equal(x["keypoint"], y["keypoint"])


def test_bad_videos_are_named_and_skipped_or_fatal(videos, tmp_path, capsys):
    root, _, _ = videos
    (root / "broken.mp4").write_bytes(b"this is not a video\n" * 50)
    (root / "empty.mp4").write_bytes(b"")
    out = tmp_path / "ann.pkl"
    argv = ["keypoints", root, "--out", out, "--estimator", ESTIMATOR, "--workers", 0, "--quiet"]
    rc, stdout, err = cli(capsys, *argv)
    assert rc == 2 and len(err.splitlines()) == 1 and "broken.mp4" in err, err
    assert not out.exists()
    rc, stdout, err = cli(capsys, *argv, "--skip-bad")
    assert rc == 0, err
    assert "2 skipped" in stdout and "broken.mp4" in stdout and "empty.mp4" in stdout
    assert len(load_annotations(out)) == 5 and not parts_folder(out).exists()


@pytest.mark.parametrize("case, argv, needle", [
    ("missing input", ["nowhere"], "nowhere does not exist"),
    ("a folder without videos", ["empty_folder"], "no videos in this folder"),
    ("a label missing", ["videos/wave", "--labels", "labels.txt"], "no label for 1 videos"),
    ("a bad estimator", ["videos", "--estimator", "no_such_module:X"], "no_such_module"),
])
def test_bad_arguments_are_one_line(case, argv, needle, videos, tmp_path, capsys):
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "labels.txt").write_text("a 0\n")
    with pytest.raises(SystemExit) if case == "a bad estimator" else contextlib.nullcontext():
        rc, _, err = cli(capsys, "keypoints", *argv, "--out", tmp_path / "ann.pkl", "--quiet")
        assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err
    if case == "a bad estimator":
        assert needle in capsys.readouterr().err

