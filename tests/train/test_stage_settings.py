"""Per-stage epochs and learning rates (train.<stage>_epochs, optim.<stage>_lr_per_16) in a run: each stage trains
its own number of epochs, from its own learning rate, with a cosine schedule spanning just those epochs."""
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
        "train.pose_epochs=3", "optim.pose_lr_per_16=0.08",        # both its own
        "optim.rgb_lr_per_16=0.04",                                # its own lr, the shared epochs
        "train.epamnet_epochs=2"])                                   # its own epochs, the shared lr
    result = run(cfg)
    assert list(result.stages) == ["pose", "rgb", "epamnet"] and not result.stopped
    assert_stage(tmp_path / "pose", epochs=3, lr_per_16=0.08)
    assert_stage(tmp_path / "rgb", epochs=1, lr_per_16=0.04)
    assert_stage(tmp_path / "epamnet", epochs=2, lr_per_16=0.02)


def test_a_single_stage_takes_its_settings_too(tmp_path, synthetic_data):
    cfg = synthetic_data.tiny_config(tmp_path, "pose", [
        f"train.batch_size={BATCH}", "train.epochs=5", "optim.lr_per_16=0.02", "train.pose_epochs=1",
        "optim.pose_lr_per_16=0.16", "train.rgb_epochs=4", "optim.rgb_lr_per_16=0.01"])
    run(cfg)
    assert_stage(tmp_path / "pose", epochs=1, lr_per_16=0.16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "environment.json", "pose", "summary.json"]
