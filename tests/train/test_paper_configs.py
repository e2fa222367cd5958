"""Every shipped paper config, run for real at the paper's sizes on generated stand-in data (epamx.data.generated:
48 pose frames at 56x56, 16 RGB frames at 224x224 decoded from H.264 videos written with PyAV, up to two COCO-17
persons in a 1920x1080 image, the config's own splits, class count and file names): its three stages with their
own pipelines, a couple of iterations each, evaluated; stopped in the RGB stage and resumed. Also `--plan` on the
same data, and the same error as `train` when the config's dataset is missing."""
import json
import pickle

import pytest
import torch

from epamx.cli import main
from epamx.config import STAGES, load_config
from epamx.data.generated import GENERATED_IMAGE, generated_config
from epamx.train import run
from epamx.train.signals import StopFlag

AUTHORS = ["ntu60_xsub", "ntu60_xview", "ntu120_xsub", "ntu120_xset", "pku_mmd", "toyota_cs"]
# two clips a batch, one epoch a stage: two training iterations on four clips, two held-out clips
SMALL = ["train.batch_size=2", "train.workers=0", "train.progress=false", "train.device=cpu",
         "train.checkpoint_every_iters=1", *[f"stages.{s}.{k}" for s in STAGES for k in ("epochs=1", "batch_size=2")]]


def small_config(name, tmp_path, extra=()):
    cfg = load_config(name, [f"data.cache_dir={tmp_path.parent / 'cache'}", f"train.out_dir={tmp_path / 'run'}",
                             *SMALL, *extra])
    return generated_config(cfg, train_clips=4, val_clips=2)


@pytest.mark.parametrize("name", AUTHORS)
def test_a_paper_config_trains_its_three_stages_at_real_sizes_stops_and_resumes(name, tmp_path):
    cfg = small_config(name, tmp_path)
    with open(cfg.data.ann_file, "rb") as f:
        data = pickle.load(f)
    assert sorted(data["split"]) == sorted([cfg.data.train_split, cfg.data.val_split])
    assert len(data["classes"]) == cfg.model.num_classes
    ann = data["annotations"][0]
    assert ann["img_shape"] == GENERATED_IMAGE and ann["keypoint"].shape[2:] == (17, 2)
    assert ann["total_frames"] >= 2 * cfg.data.clip_len

    stop, seen = StopFlag(), []

    def on_iteration(stage, record):
        seen.append((stage, record["step"]))
        if stage == "rgb":
            stop.request("test")

    first = run(cfg, stop=stop, on_iteration=on_iteration)
    assert first.stopped and list(first.stages) == ["pose", "rgb"] and seen == [("pose", 1), ("pose", 2), ("rgb", 1)]
    seen.clear()
    second = run(cfg, on_iteration=on_iteration)
    assert not second.stopped and list(second.stages) == list(STAGES)
    assert seen == [("rgb", 2), ("epamnet", 1), ("epamnet", 2)]  # the pose stage was complete; rgb went on
    out = cfg.train.out_dir
    summary = json.loads(open(f"{out}/summary.json").read())
    metric = cfg.train.metric
    for stage, primary in (("pose", "pose"), ("rgb", "rgb"), ("epamnet", "summed")):
        result = summary["stages"][stage]
        assert result["primary"] == primary and 0 <= result["metrics"][primary][metric] <= 1
        assert result["best_epoch"]["epoch"] == result["epoch"] == 1
        final = torch.load(f"{out}/{stage}/final.pt", map_location="cpu", weights_only=False)
        assert final["meta"]["num_classes"] == cfg.model.num_classes and final["meta"]["batch_size"] == 2
        assert f'pipeline = "{cfg.stage(stage).pipeline}"' in final["config"]
    # the stages read their own pipelines: the pose stage's keypoints cropped in the workers, the RGB stage's
    # 16 frames sampled on their own, EPAM-Net's every third of 48
    assert [cfg.stage(s).pipeline for s in STAGES] == ["pose_only", "rgb_only", "multimodal"]
    assert cfg.data.keypoint_flip == "authors" and {cfg.stage(s).amp for s in STAGES} == {"off"}


def test_plan_measures_each_stage_on_the_generated_data(tmp_path, capsys):
    from epamx.train.plan import plan_run

    cfg = small_config("ntu60_xsub", tmp_path, ["stages.pose.batch_size=3", "stages.rgb.batch_size=2",
                                                "stages.epamnet.batch_size=1"])
    plans = plan_run(cfg, iters=1, clips=(40091, 16487))
    assert [p.mode for p in plans] == list(STAGES)
    assert [p.measured_batch for p in plans] == [3, 2, 1] and all(p.fits for p in plans)
    for p in plans:
        assert p.train_clips_per_s > 0 and p.eval_clips_per_s > p.train_clips_per_s / 2 and p.peak_memory > 2 ** 20
        assert p.load_s_per_clip > 0 and p.workers_needed >= 1 and 0 <= p.data_wait < 1
        assert (p.train_clips, p.val_clips, p.epochs, p.evaluations) == (40091, 16487, 1, 1)
        # the schedule: training iterations at the measured speed (at least), plus the evaluations
        assert p.train_s >= 0.9 * (40091 // p.measured_batch) * p.measured_batch / p.train_clips_per_s
        assert p.eval_s > 0
    # the command prints it, says which data it measured, and trains nothing
    rc = main(["train", "--config", "ntu60_xsub", "--generated-data", "--plan", "--plan-iters", "1",
               "--plan-clips", "400,100", f"data.cache_dir={tmp_path.parent / 'cache'}",
               f"train.out_dir={tmp_path / 'cli'}", *SMALL])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "data measured: generated stand-in clips at the config's sizes" in out
    assert "schedule for 400 training and 100 held-out clips (given (--plan-clips))" in out
    for stage, pipeline in (("pose", "pose_only"), ("rgb", "rgb_only"), ("epamnet", "multimodal")):
        assert any(line.split()[:2] == [stage, pipeline] for line in out.splitlines()), out
    assert "whole schedule:" in out
    assert not (tmp_path / "cli-generated").exists() or not any((tmp_path / "cli-generated").rglob("*.pt"))


def test_plan_with_a_missing_dataset_is_the_same_error_as_train(tmp_path, capsys):
    errors = []
    for plan in ([], ["--plan"]):
        rc = main(["train", "--config", "ntu60_xsub", *plan, f"data.ann_file={tmp_path / 'nope.pkl'}",
                   f"train.out_dir={tmp_path / 'run'}", "train.device=cpu"])
        errors.append((rc, capsys.readouterr().err.strip().splitlines()[-1]))
    assert errors[0] == errors[1] and errors[0][0] == 2
    assert f"data.ann_file {tmp_path / 'nope.pkl'} does not exist" in errors[0][1]


@pytest.mark.parametrize("value", ["40091", "1,2,3", "0,5", "a,b"])
def test_plan_clips_must_be_two_counts(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--plan", "--plan-clips", value])
    assert exit_.value.code == 2
    assert f"--plan-clips: expected TRAIN,VAL clip counts (two integers >= 1), got '{value}'" in capsys.readouterr().err


class _FakeTrial:
    def __init__(self, device):
        self.device = torch.device(device)
        self.recipe = type("R", (), {"mode": "rgb"})()


@pytest.mark.parametrize("device, memory, per_clip, base, batch, expected", [
    ("cuda", 80, 3, 2, 12, (12, None)),      # fits: measured at the config's batch
    ("cuda", 80, 9, 2, 12, (7, 7)),          # 2 + 9 * 7 = 65 <= 72 < 2 + 9 * 8: the largest that fits, found by trying
    ("cuda", 80, 30, 5, 12, (2, 2)),
    ("cpu", 100, 5, 10, 12, (12, None)),      # 10 + 5 * 12 = 70 <= 90
    ("cpu", 100, 9, 10, 12, (8, 8)),          # estimated from batches 1 and 2: (90 - 19) // 9 + 1 = 8
])
def test_a_batch_that_does_not_fit_gets_the_largest_that_does(monkeypatch, device, memory, per_clip, base, batch,
                                                              expected):
    """The plan's batch search with the device's memory and each batch's peak stubbed: CUDA tries batches (an
    out-of-memory error is caught), the CPU estimates from batches 1 and 2 (a CPU out of memory kills)."""
    from epamx.train import plan

    tried = []

    def fits(trial, dataset, b, seed):
        tried.append(b)
        peak = base + per_clip * b
        ok = peak <= memory * plan._HEADROOM
        if trial.device.type == "cpu":
            assert ok, f"the CPU tried batch {b}, which does not fit"
        return ok, peak if ok else 0

    monkeypatch.setattr(plan, "_fits", fits)
    monkeypatch.setattr(plan, "_available", lambda device: memory)
    chosen, advised, needed = plan._choose_batch(_FakeTrial(device), None, batch, 0)
    assert (chosen, advised) == expected
    assert (needed > memory * plan._HEADROOM) == (advised is not None and device == "cpu")
    assert tried[:2] == [1, 2]
