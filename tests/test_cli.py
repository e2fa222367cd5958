"""The command line on a tiny embedded dataset: every command end to end (in this process, through
epamx.cli.main; two through a subprocess for the exit status), and bad input as exit status 2 with one line on
stderr naming what is wrong, never a traceback."""
import contextlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from epamx.cli import main
from epamx.config import load_config
from epamx.data import load_annotations, read_video, write_video
from epamx.data.embedded import CLASSES, build_embedded
from testkit import one_thread

ROOT = Path(__file__).resolve().parents[1]

# 12 classes x (2 + 1) clips of 12 frames at 32x32; 6 pose frames at 8x8, 2 RGB frames at 32x32; one epoch a stage.
TINY = ["data.embedded.train_per_class=2", "data.embedded.val_per_class=1", "data.embedded.frames=12",
        "data.embedded.image_size=32", "data.frame_size=32", "data.heatmap_size=8", "data.clip_len=6",
        "train.batch_size=4", "train.workers=0", "stages.pose.epochs=1", "stages.rgb.epochs=1",
        "stages.epamnet.epochs=1", "train.epochs=1", "train.progress=false"]


def tiny(tmp: Path, out: str = "run"):
    return [f"data.cache_dir={tmp / 'cache'}", f"train.out_dir={tmp / out}", *TINY]




@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test runs in its own folder (relative default paths land there), one thread, no EPAMX_DEBUG."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EPAMX_DEBUG", raising=False)
    with one_thread():
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One `train` of the three stages, shared by the tests that use its run: (root, run folder, rc, stdout)."""
    root = tmp_path_factory.mktemp("cli")
    stdout, stderr = io.StringIO(), io.StringIO()
    with one_thread(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["train", *tiny(root)])
    return root, root / "run", rc, stdout.getvalue()


def cli(capsys, *argv):
    """main(argv) -> (exit status, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def subprocess_cli(*argv):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("EPAMX_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "epamx", *map(str, argv)], capture_output=True, text=True,
                          timeout=300, env=env)


# ---- train -------------------------------------------------------------------------------------------------------

def test_train_runs_the_three_stages_and_says_where(trained):
    root, run, rc, out = trained
    assert rc == 0, out
    for stage, primary in (("pose", "pose"), ("rgb", "rgb"), ("epamnet", "summed")):
        assert re.search(rf"^\[{stage}\] held-out top1 \({primary}\): \d+\.\d\d% \(last epoch, 1\)$", out, re.M), out
    assert f"Everything is in {run}/" in out
    for name in ("summary.json", "config.toml", "environment.json"):
        assert (run / name).is_file(), name
    for stage in ("pose", "rgb", "epamnet"):
        for name in ("final.pt", "log.jsonl", "curves.png", "confusion.png", "metrics.json", "per_class.txt"):
            assert (run / stage / name).is_file(), f"{stage}/{name}"
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["stages"]) == ["pose", "rgb", "epamnet"]
    assert set(summary["stages"]["epamnet"]["metrics"]) == {"rgb", "pose", "summed"}
    # the run records the config it ran, overrides included
    assert load_config(run / "config.toml").data.cache_dir == str(root / "cache")


def test_epochs_sets_every_stage(tmp_path, capsys, monkeypatch):
    """--epochs N: N epochs a stage, over the config's per-stage epochs; an override after it still sets one
    stage; without it, the config's own."""
    import epamx.train
    from epamx.train import RunResult

    configs = []

    def run(cfg):
        configs.append(cfg)
        return RunResult(tmp_path, {})

    monkeypatch.setattr(epamx.train, "run", run)
    assert cli(capsys, "train", "--epochs", 3, f"train.out_dir={tmp_path}")[0] == 0
    assert cli(capsys, "train", "--epochs", 3, "stages.epamnet.epochs=1", f"train.out_dir={tmp_path}")[0] == 0
    assert cli(capsys, "train", f"train.out_dir={tmp_path}")[0] == 0
    stages = [[cfg.stage(m).epochs for m in ("pose", "rgb", "epamnet")] for cfg in configs]
    from epamx.config import load_config

    shipped = load_config("embedded")
    assert stages == [[3, 3, 3], [3, 3, 1], [shipped.stage(m).epochs for m in ("pose", "rgb", "epamnet")]]


# ---- eval --------------------------------------------------------------------------------------------------------

def test_eval_writes_metrics_table_and_confusion(trained, tmp_path, capsys):
    root, run, _, _ = trained
    rc, out, err = cli(capsys, "eval", "--checkpoint", run, "--quiet", "--out", tmp_path / "eval")
    assert rc == 0, err
    assert f"{run / 'epamnet' / 'final.pt'} on split 'val': 12 clips" in out
    assert re.search(r"^summed +\d+\.\d\d% +\d+\.\d\d% +\d+\.\d\d%$", out, re.M), out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["num_samples"] == 12 and metrics["primary"] == "summed"
    for stream in ("rgb", "pose", "summed"):
        assert set(metrics["metrics"][stream]) == {"top1", "top5", "mean_class_accuracy"}
        assert all(0 <= v <= 1 for v in metrics["metrics"][stream].values())
    # the held-out evaluation at the end of training, reproduced from the checkpoint
    trained_metrics = json.loads((run / "summary.json").read_text())["stages"]["epamnet"]["metrics"]
    assert metrics["metrics"] == trained_metrics
    table = (tmp_path / "eval" / "per_class.txt").read_text()
    assert all(name in table for name in CLASSES)
    with Image.open(tmp_path / "eval" / "confusion.png") as png:
        assert min(png.size) > 100

    rc, out, err = cli(capsys, "eval", "--checkpoint", run / "pose" / "final.pt", "--quiet", "--json",
                       "--out", tmp_path / "eval_pose")
    assert rc == 0, err
    parsed = json.loads(out)
    assert parsed["checkpoint"] == str(run / "pose" / "final.pt") and parsed["primary"] == "pose"
    assert set(parsed["metrics"]) == {"pose"}


def test_eval_and_predict_in_bfloat16_agree_with_float32(trained, capsys):
    """The held-out clips of the tiny run: the same top-1 class per clip and the same metrics in bfloat16."""
    _, run, _, _ = trained
    results = {}
    for dtype in ("float32", "bfloat16"):
        rc, out, err = cli(capsys, "predict", "--checkpoint", run, "--json", "--dtype", dtype)
        assert rc == 0, err
        results[dtype] = json.loads(out)["clips"]
    assert len(results["float32"]) == 12
    for f32, bf16 in zip(results["float32"], results["bfloat16"]):
        assert f32["frame_dir"] == bf16["frame_dir"] and f32["top"][0][0] == bf16["top"][0][0]
        assert abs(f32["top"][0][1] - bf16["top"][0][1]) < 5e-2
    metrics = {}
    for dtype in ("float32", "bfloat16"):
        rc, out, err = cli(capsys, "eval", "--checkpoint", run, "--quiet", "--json", f"model.inference_dtype={dtype}")
        assert rc == 0, err
        metrics[dtype] = json.loads(out)["metrics"]
    assert metrics["bfloat16"]["summed"]["top1"] == metrics["float32"]["summed"]["top1"]


# ---- predict -----------------------------------------------------------------------------------------------------

def test_predict_annotation_clips(trained, capsys):
    _, run, _, _ = trained
    rc, out, err = cli(capsys, "predict", "--checkpoint", run, "--limit", 3)
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    for line, frame_dir in zip(lines, ["val_00000_wave", "val_00001_raise_arms", "val_00002_clap"]):
        name, _, top = line.partition(": ")
        assert name == frame_dir
        pairs = [p.rsplit(" ", 1) for p in top.split(", ")]
        assert len(pairs) == 5 and all(c in CLASSES for c, _ in pairs)
        scores = [float(s) for _, s in pairs]
        assert scores == sorted(scores, reverse=True) and sum(scores) <= 1 + 1e-3

    rc, out, err = cli(capsys, "predict", "--checkpoint", run, "--limit", 3, "--top-k", 3, "--json")
    assert rc == 0, err
    clips = json.loads(out)["clips"]
    assert [c["frame_dir"] for c in clips] == ["val_00000_wave", "val_00001_raise_arms", "val_00002_clap"]
    for clip in clips:
        assert len(clip["top"]) == 3 and len({c for c, _ in clip["top"]}) == 3
        assert all(c in CLASSES and 0 <= s <= 1 for c, s in clip["top"])
        assert sum(s for _, s in clip["top"]) <= 1 + 1e-3
        assert set(clip["streams"]) == {"rgb", "pose"} and set(clip["streams"].values()) <= set(CLASSES)


def embedded_clip(root: Path, tmp_path: Path, frame_dir: str = "val_00000_wave"):
    """One embedded clip as a user would have it: its video, and its keypoints in an .npz."""
    cfg = load_config("embedded", tiny(root))
    paths = build_embedded(cfg.data, progress=False)
    (ann,) = load_annotations(paths["ann_file"], [frame_dir])
    video = tmp_path / "clip.mp4"
    video.write_bytes((Path(paths["video_root"]) / f"{frame_dir}.mp4").read_bytes())
    keypoints = tmp_path / "clip.npz"
    np.savez(keypoints, keypoint=ann["keypoint"], keypoint_score=ann["keypoint_score"],
             img_shape=np.array(ann["img_shape"]))
    return video, keypoints


def test_predict_a_video_with_its_keypoints(trained, tmp_path, capsys):
    root, run, _, _ = trained
    video, keypoints = embedded_clip(root, tmp_path)
    rc, out, err = cli(capsys, "predict", "--checkpoint", run, "--video", video, "--keypoints", keypoints,
                       "--precropped", "--json")
    assert rc == 0, err
    (clip,) = json.loads(out)["clips"]
    assert clip["frame_dir"] == "clip"
    # the same video and keypoints as annotation entry val_00000_wave: the same clip, the same prediction
    rc, out, err = cli(capsys, "predict", "--checkpoint", run, "--sample", "val_00000_wave", "--json")
    assert rc == 0, err
    (entry,) = json.loads(out)["clips"]
    assert clip["top"] == entry["top"] and clip["streams"] == entry["streams"]

    # not precropped: cropped here to the persons' box
    rc, out, err = cli(capsys, "predict", "--checkpoint", run, "--video", video, "--keypoints", keypoints)
    assert rc == 0, err
    assert out.startswith("clip: ") and len(out.splitlines()) == 1


# ---- render ------------------------------------------------------------------------------------------------------

def test_render_writes_a_picture(trained, tmp_path, capsys):
    _, run, _, _ = trained
    rc, out, err = cli(capsys, "render", "--checkpoint", run, "--limit", 1, "--out", tmp_path / "renders")
    assert rc == 0, err
    assert out.splitlines() == [str(tmp_path / "renders" / "val_00000_wave.png")]
    with Image.open(tmp_path / "renders" / "val_00000_wave.png") as png:
        png.load()
        assert png.size[0] >= 600 and png.size[1] >= 400
        assert len(np.unique(np.asarray(png.convert("L")))) > 20  # a picture, not a blank page
    assert sorted(os.listdir(tmp_path / "renders")) == ["val_00000_wave.png"]


def test_render_titles_name_the_annotated_class_only_where_there_is_one(trained, tmp_path, capsys, monkeypatch):
    import epamx.plots as plots

    root, run, _, _ = trained
    titles = []
    save_figure = plots.save_figure

    def saving(fig, out_png, **kwargs):
        titles.append(fig._suptitle.get_text())
        return save_figure(fig, out_png, **kwargs)

    monkeypatch.setattr(plots, "save_figure", saving)
    video, keypoints = embedded_clip(root, tmp_path)
    labelled = tmp_path / "labelled.npz"
    np.savez(labelled, **dict(np.load(keypoints)), label=np.int64(CLASSES.index("wave")))
    for args in (["--sample", "val_00000_wave"], ["--video", video, "--keypoints", keypoints],
                 ["--video", video, "--keypoints", labelled]):
        rc, _, err = cli(capsys, "render", "--checkpoint", run, "--out", tmp_path / "renders", *args)
        assert rc == 0, err
    assert titles[0].startswith("val_00000_wave: ") and titles[0].endswith("(annotated: wave)")
    assert titles[1].startswith("clip: ") and "annotated" not in titles[1]  # a video alone has no annotation
    assert titles[2].endswith("(annotated: wave)")


# ---- prepare -----------------------------------------------------------------------------------------------------

def raw_dataset(root: Path, lengths=(9, 12)):
    """Raw videos (48x64, one person in a box of random size) and their annotation pickle."""
    rng = np.random.RandomState(0)
    (root / "videos").mkdir(parents=True)
    anns = []
    for i, length in enumerate(lengths):
        frame_dir = f"S001C001P00{i}"
        centre = rng.uniform(20, 30, size=2)
        kp = centre + rng.uniform(-10, 10, size=(1, length, 17, 2))
        anns.append({"frame_dir": frame_dir, "label": i, "img_shape": (48, 64), "original_shape": (48, 64),
                     "total_frames": length, "keypoint": kp.astype(np.float32),
                     "keypoint_score": np.ones((1, length, 17), np.float32)})
        frames = rng.randint(0, 256, size=(length, 48, 64, 3)).astype(np.uint8)
        write_video(root / "videos" / f"{frame_dir}.mp4", frames)
    with open(root / "ann.pkl", "wb") as f:
        pickle.dump({"split": {"all": [a["frame_dir"] for a in anns]}, "annotations": anns}, f)
    return root / "ann.pkl"


def test_prepare_crops_raw_videos(tmp_path, capsys):
    ann = raw_dataset(tmp_path)
    args = ["prepare", "--ann", ann, "--video-root", tmp_path / "videos", "--out", tmp_path / "out", "--size", 32,
            "--workers", 0, "--quiet"]
    rc, out, err = cli(capsys, *args)
    assert rc == 0, err
    assert out.startswith("prepared 2 clips (0 already done)") and out.rstrip().endswith("0 failed")
    assert sorted(os.listdir(tmp_path / "out")) == ["S001C001P000_rgb.mp4", "S001C001P001_rgb.mp4"]
    assert read_video(tmp_path / "out" / "S001C001P001_rgb.mp4", range(12)).shape == (12, 32, 32, 3)

    rc, out, err = cli(capsys, *args)
    assert rc == 0 and out.startswith("prepared 0 clips (2 already done)")

    # a missing raw video: without --skip-bad one line naming the sample; with it, listed and the rest prepared
    (tmp_path / "videos" / "S001C001P000.mp4").unlink()
    args[args.index(tmp_path / "out")] = tmp_path / "out2"
    rc, out, err = cli(capsys, *args)
    assert rc == 2 and len(err.splitlines()) == 1 and "S001C001P000" in err, err
    rc, out, err = cli(capsys, *args, "--skip-bad")
    assert rc == 0 and "1 failed" in out and "S001C001P000" in out
    assert os.listdir(tmp_path / "out2") == ["S001C001P001_rgb.mp4"]


# ---- info --------------------------------------------------------------------------------------------------------

def test_info(capsys):
    rc, out, _ = cli(capsys, "info")
    assert rc == 0 and re.search(r"^operators +.*epamx::temporal_shift", out, re.M), out
    rc, out, _ = cli(capsys, "info", "--json")
    assert rc == 0 and "epamx::render_heatmaps" in json.loads(out)["operators"]


# ---- bad input ---------------------------------------------------------------------------------------------------

def assert_one_line_error(rc, out, err, command, *needles):
    assert rc == 2, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"epamx {command}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


ERRORS = {
    "unknown config key": (
        lambda run, tmp: ["train", *tiny(tmp), "train.epoch=1"],
        ["unknown key 'epoch' in [train]; did you mean 'epochs'?"]),
    "unknown key in a config file": (
        lambda run, tmp: ["train", "--config", tmp / "bad.toml", *tiny(tmp)],
        ["bad.toml", "unknown key 'lr' in [optim]; did you mean 'lr_per_16'?"]),
    "bad override value type": (
        lambda run, tmp: ["train", *tiny(tmp), "train.batch_size=four"],
        ["train.batch_size must be an integer, got 'four'"]),
    "a float for an integer": (
        lambda run, tmp: ["eval", "--checkpoint", run, "train.batch_size=2.5"],
        ["train.batch_size must be an integer, got 2.5"]),
    "posec3d without ann_file": (
        lambda run, tmp: ["train", *tiny(tmp), "data.dataset=posec3d"],
        ["data.ann_file is empty"]),
    "posec3d with a missing ann_file": (
        lambda run, tmp: ["train", *tiny(tmp), "data.dataset=posec3d", f"data.ann_file={tmp / 'none.pkl'}"],
        ["data.ann_file", "none.pkl does not exist"]),
    "missing checkpoint": (
        lambda run, tmp: ["eval", "--checkpoint", tmp / "nowhere"],
        ["checkpoint", "nowhere does not exist"]),
    "a folder without checkpoints": (
        lambda run, tmp: ["predict", "--checkpoint", tmp],
        ["holds no final.pt"]),
    "not a checkpoint": (
        lambda run, tmp: ["eval", "--checkpoint", tmp / "bad.toml"],
        ["bad.toml", "weights-only checkpoint"]),
    "render a single-stream checkpoint": (
        lambda run, tmp: ["render", "--checkpoint", run / "pose", "--out", tmp / "r"],
        ["render needs an EPAM-Net checkpoint"]),
    "--video without --keypoints, a missing video": (
        lambda run, tmp: ["predict", "--checkpoint", run, "--video", tmp / "clip.mp4"],
        ["video", "clip.mp4 does not exist"]),
    "--keypoints without --video": (
        lambda run, tmp: ["render", "--checkpoint", run, "--keypoints", tmp / "clip.npz"],
        ["--keypoints with --video"]),
    "a missing video": (
        lambda run, tmp: ["predict", "--checkpoint", run, "--video", tmp / "none.mp4", "--keypoints", tmp / "x.npz"],
        ["video", "none.mp4 does not exist"]),
    "an unknown sample": (
        lambda run, tmp: ["predict", "--checkpoint", run, "--sample", "val_99999_nothing"],
        ["val_99999_nothing"]),
    "a nonexistent config name": (
        lambda run, tmp: ["train", "--config", "ntu61_xsub", *tiny(tmp)],
        ["no config 'ntu61_xsub'", "ntu60_xsub"]),
    "a nonexistent config name for eval": (
        lambda run, tmp: ["eval", "--checkpoint", run, "--config", "nope"],
        ["no config 'nope'"]),
    "a device torch does not know": (
        lambda run, tmp: ["predict", "--checkpoint", run, "--device", "gpu"],
        ["train.device = 'gpu' is not a device"]),
    "a malformed device for train": (
        lambda run, tmp: ["train", *tiny(tmp), "--device", "cuda:x"],
        ["train.device = 'cuda:x' is not a device"]),
    "an unknown split": (
        lambda run, tmp: ["eval", "--checkpoint", run, "--split", "test", "--quiet"],
        ["no split 'test'"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_one_line_and_exit_status_2(case, trained, tmp_path, capsys):
    _, run, _, _ = trained
    (tmp_path / "bad.toml").write_text("[optim]\nlr = 0.1\n")
    argv, needles = ERRORS[case]
    argv = argv(run, tmp_path)
    rc, out, err = cli(capsys, *argv)
    assert_one_line_error(rc, out, err, argv[0], *needles)
    assert not (tmp_path / "run" / "pose").exists()  # nothing was trained


@pytest.mark.parametrize("argv, needle", [
    (["predict", "--top-k", "0"], "argument --top-k: expected an integer >= 1, got '0'"),
    (["predict", "--limit", "-1"], "argument --limit: expected an integer >= 0, got '-1'"),
    (["render", "--limit", "-2"], "argument --limit: expected an integer >= 0, got '-2'"),
    (["prepare", "--ann", "a.pkl", "--video-root", ".", "--out", "o", "--workers", "-1"],
     "argument --workers: expected an integer >= 0, got '-1'"),
])
def test_counts_are_checked_by_the_parser(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and err.strip().splitlines()[-1].endswith(needle), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "eval", "predict", "render"])
def test_cuda_asked_for_without_a_gpu(command, trained, tmp_path, capsys):
    _, run, _, _ = trained
    argv = [command, *tiny(tmp_path)] if command == "train" else [command, "--checkpoint", run]
    rc, out, err = cli(capsys, *argv, "--device", "cuda")
    assert_one_line_error(rc, out, err, command, "train.device = 'cuda', but torch sees no CUDA GPU here")


def test_in_a_subprocess(trained, tmp_path):
    """The exit status and streams a shell sees: an error is one line on stderr, a result JSON on stdout."""
    _, run, _, _ = trained
    result = subprocess_cli("train", *tiny(tmp_path), "optim.lr=0.1")
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("epamx train: error: ") and "'optim.lr=0.1'" in line and "'lr_per_16'" in line, line

    result = subprocess_cli("predict", "--checkpoint", run, "--limit", 1, "--top-k", 2, "--json")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    (clip,) = json.loads(result.stdout)["clips"]
    assert clip["frame_dir"] == "val_00000_wave" and len(clip["top"]) == 2


def test_resume_flags(tmp_path, capsys, monkeypatch):
    """Resuming is the default (--resume says so explicitly); --no-resume turns it off; both at once is an error."""
    import epamx.train
    from epamx.train import RunResult

    seen = []
    monkeypatch.setattr(epamx.train, "run", lambda cfg: seen.append(cfg.train.resume) or RunResult(tmp_path, {}))
    for flags in ([], ["--resume"], ["--no-resume"]):
        assert cli(capsys, "train", *flags, f"train.out_dir={tmp_path}")[0] == 0
    assert seen == [True, True, False]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", "--no-resume"])
    assert exit_info.value.code == 2


def test_no_resume_on_a_folder_that_holds_a_run_is_one_line(tmp_path, capsys, monkeypatch):
    """--no-resume where a stage already has checkpoints: exit 2, one line naming the folder and the fix."""
    import epamx.train
    from epamx.train import run_stage
    from epamx.train.checkpoint import write_latest

    def run(cfg):
        stage = tmp_path / "pose"
        (stage / "checkpoints").mkdir(parents=True)
        (stage / "checkpoints" / "step_1.pt").write_bytes(b"")
        write_latest(stage, stage / "checkpoints" / "step_1.pt")
        return run_stage(cfg, "pose", stage)

    monkeypatch.setattr(epamx.train, "run", run)
    code, _, err = cli(capsys, "train", "--no-resume", f"train.out_dir={tmp_path}")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "already holds a run" in err and "train.resume=true" in err


def test_overrides_may_stand_between_the_options(tmp_path, capsys, monkeypatch):
    """`train a.b=1 --out X c.d=2`: overrides before, between and after the options are all taken, in order."""
    import epamx.train
    from epamx.train import RunResult

    seen = []
    monkeypatch.setattr(epamx.train, "run", lambda cfg: seen.append(cfg) or RunResult(tmp_path, {}))
    rc, _, err = cli(capsys, "train", "train.seed=5", "--out", tmp_path / "x", "train.batch_size=3", "--epochs", 2,
                     "train.seed=7")
    assert rc == 0, err
    (cfg,) = seen
    assert (cfg.train.seed, cfg.train.batch_size, cfg.train.epochs, cfg.train.out_dir) == (7, 3, 2, str(tmp_path / "x"))
    with pytest.raises(SystemExit) as exit_:
        main(["train", "train.seed=5", "--bogus", "train.batch_size=3"])
    assert exit_.value.code == 2 and "--bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["info", "train.seed=5"])  # info takes no overrides


def test_an_internal_error_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    """Only epamx's own user-facing errors become one line: a bug (any other exception, a ValueError included)
    propagates with its traceback."""
    import epamx.train

    def broken(cfg):
        raise ValueError("an internal bug")

    monkeypatch.setattr(epamx.train, "run", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["train", f"train.out_dir={tmp_path}"])


def test_the_old_stage_name_is_understood(tmp_path, capsys, monkeypatch):
    """--mode fused (the EPAM-Net stage's old name) runs the epamnet stage and says so."""
    import epamx.train
    from epamx.train import RunResult

    seen = []
    monkeypatch.setattr(epamx.train, "run", lambda cfg: seen.append(cfg.train.mode) or RunResult(tmp_path, {}))
    rc, _, err = cli(capsys, "train", "--mode", "fused", f"train.out_dir={tmp_path}")
    assert rc == 0 and seen == ["epamnet"] and "--mode epamnet" in err
