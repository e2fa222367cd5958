"""Per-stage recipes ([stages.<stage>]) in a run: each stage trains its own number of epochs, with its own batch
size, from its own learning rate, with a cosine schedule spanning just those epochs; the best held-out epoch is
reported beside the last."""
import json
import math

import pytest

from epamx.train import run
from epamx.train.checkpoint import load_checkpoint

BATCH = 4
ITERS = 24 // BATCH  # the stand-in's 24 training clips


def records(folder):
    lines = (folder / "log.jsonl").read_text().splitlines()
    all_records = [json.loads(line) for line in lines]
    return [r for r in all_records if r["type"] == "train"], [r for r in all_records if r["type"] == "eval"]


def assert_stage(folder, epochs, lr_per_16):
    train, evals = records(folder)
    base = lr_per_16 * BATCH / 16
    total = epochs * ITERS
    assert [r["step"] for r in train] == list(range(1, total + 1))
    assert sorted({r["epoch"] for r in train}) == list(range(epochs))
    assert [r["epoch"] for r in evals] == list(range(1, epochs + 1))
    # the lr logged is the one the step used: the stage's at its first step, the cosine over its own steps at its last
    assert train[0]["lr"] == pytest.approx(base)
    assert train[-1]["lr"] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * (total - 1) / total)))
    final = load_checkpoint(folder / "final.pt")
    assert [h["epoch"] for h in final["history"]] == list(range(1, epochs + 1))
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == [
        f"epoch_{e:03d}.pt" for e in range(1, epochs + 1)]


def test_each_stage_of_the_protocol_runs_its_own_epochs_at_its_own_lr(tmp_path, synthetic_data):
    cfg = synthetic_data.tiny_config(tmp_path, "all", [
        f"train.batch_size={BATCH}", "train.epochs=1", "optim.lr_per_16=0.02",
        "stages.pose.epochs=3", "stages.pose.lr_per_16=0.08",      # both its own
        "stages.rgb.lr_per_16=0.04",                               # its own lr, the shared epochs
        "stages.epamnet.epochs=2"])                                # its own epochs, the shared lr
    result = run(cfg)
    assert list(result.stages) == ["pose", "rgb", "epamnet"] and not result.stopped
    assert_stage(tmp_path / "pose", epochs=3, lr_per_16=0.08)
    assert_stage(tmp_path / "rgb", epochs=1, lr_per_16=0.04)
    assert_stage(tmp_path / "epamnet", epochs=2, lr_per_16=0.02)


def test_a_single_stage_takes_its_settings_too(tmp_path, synthetic_data):
    cfg = synthetic_data.tiny_config(tmp_path, "pose", [
        f"train.batch_size={BATCH}", "train.epochs=5", "optim.lr_per_16=0.02", "stages.pose.epochs=1",
        "stages.pose.lr_per_16=0.16", "stages.rgb.epochs=4", "stages.rgb.lr_per_16=0.01"])
    run(cfg)
    assert_stage(tmp_path / "pose", epochs=1, lr_per_16=0.16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "environment.json", "pose", "summary.json"]


def test_a_stage_s_own_batch_size(tmp_path, synthetic_data):
    cfg = synthetic_data.tiny_config(tmp_path, "pose", [
        "train.batch_size=2", "train.epochs=1", "stages.pose.batch_size=6", "stages.pose.lr_per_16=0.16"])
    run(cfg)
    train, _ = records(tmp_path / "pose")
    assert len(train) == 24 // 6
    assert train[0]["lr"] == pytest.approx(0.16 * 6 / 16)
    assert load_checkpoint(tmp_path / "pose" / "final.pt")["meta"]["batch_size"] == 6


def test_the_best_epoch_is_reported_beside_the_last(tmp_path, synthetic_data, capsys):
    from epamx.train.stage import best_evaluation

    cfg = synthetic_data.tiny_config(tmp_path, "pose", [f"train.batch_size={BATCH}", "train.epochs=4"])
    result = run(cfg).stages["pose"]
    _, evals = records(tmp_path / "pose")
    top1 = [e["metrics"]["pose"]["top1"] for e in evals]
    best = max(range(len(top1)), key=lambda i: (top1[i], -i))
    assert result.epochs == 4 and result.headline() == top1[-1]         # the headline is the last epoch
    assert result.best["epoch"] == best + 1 and result.best_value() == top1[best]
    metrics = json.loads((tmp_path / "pose" / "metrics.json").read_text())
    assert metrics["epoch"] == 4 and metrics["best_epoch"]["epoch"] == best + 1
    summary = json.loads((tmp_path / "summary.json").read_text())["stages"]["pose"]
    assert summary["best_epoch"]["epoch"] == best + 1 and summary["epoch"] == 4
    out = capsys.readouterr().out
    assert "(last epoch, 4)" in out
    if best + 1 != 4:
        assert f"best {100 * top1[best]:.2f}% (epoch {best + 1})" in out
    # ties go to the earliest epoch; no evaluation, no best
    history = [{"type": "eval", "epoch": e, "step": e, "primary": "pose", "metrics": {"pose": {"top1": v}}}
               for e, v in ((1, 0.5), (2, 0.7), (3, 0.7), (4, 0.6))]
    assert best_evaluation(history, "top1")["epoch"] == 2
    assert best_evaluation([{"type": "train"}], "top1") is None
    # a complete stage run again reports the same
    again = run(cfg).stages["pose"]
    assert (again.epochs, again.best["epoch"]) == (4, best + 1)
