"""The loop: the schedule, gradient clipping, evaluation's de-duplication, and whole runs on the synthetic stand-in
(learning above chance; the three-stage protocol; what a run writes)."""
import json
import math
import tomllib

import numpy as np
import pytest
import torch

from epamx.config import config_from_dict
from epamx.errors import CheckpointError, ConfigError
from epamx.inference import evaluate, resolve_amp
from epamx.inference.metrics import stream_metrics
from epamx.models import PoseStream
from epamx.train import StopFlag, cosine_schedule, run, run_stage, train_one_epoch
from epamx.train.checkpoint import load_checkpoint


def _learning_rates(optimizer, scheduler, steps):
    """The learning rate each of ``steps`` iterations runs at."""
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_schedule_per_iteration():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = cosine_schedule(optimizer, total_iters=10, min_lr=0.01)
    lrs = _learning_rates(optimizer, scheduler, 10)
    expected = [0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(10)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # at total_iters: the floor


def test_warmup_rises_linearly_into_the_cosine():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = cosine_schedule(optimizer, total_iters=100, warmup_iters=4)
    lrs = _learning_rates(optimizer, scheduler, 6)
    cos = [0.5 * (1 + math.cos(math.pi * t / 100)) for t in range(6)]
    # the first step already trains (at a quarter of the lr), the fourth at the full cosine value
    np.testing.assert_allclose(lrs, [cos[0] / 4, cos[1] / 2, cos[2] * 3 / 4, cos[3], cos[4], cos[5]], rtol=1e-12)


def test_cosine_schedule_takes_each_group_from_its_lr_to_the_floor():
    params = [torch.zeros(1, requires_grad=True) for _ in range(2)]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr": 0.1}, {"params": [params[1]], "lr": 0.4}], lr=0.1)
    scheduler = cosine_schedule(optimizer, total_iters=8, min_lr=0.02)
    for t in range(8):
        for group, base in zip(optimizer.param_groups, (0.1, 0.4)):
            expected = 0.02 + (base - 0.02) * 0.5 * (1 + math.cos(math.pi * t / 8))
            assert group["lr"] == pytest.approx(expected, rel=1e-12)
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.02, 0.02])


def test_resolve_amp():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16 and resolve_amp("fp16", cpu) is torch.float16


def small_pose_setup(synthetic, batch_size=4):
    cfg = synthetic.tiny_config("unused", "pose").data
    dataset = synthetic.build_dataset(cfg, cfg.train_split, train=True, modalities=("pose",))
    loader = synthetic.build_loader(dataset, batch_size, train=True, seed=0, workers=0)
    return cfg, loader, synthetic.BatchTransform(cfg, ("pose",))


def test_gradients_are_clipped_to_the_norm(synthetic_data):
    cfg, loader, transform = small_pose_setup(synthetic_data)
    torch.manual_seed(0)
    model = PoseStream(3, dropout=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # no momentum or decay: the step is -lr * grad
    records = []
    stop = StopFlag()

    def one_step(record):
        records.append(record)
        stop.request()

    train_one_epoch(model, loader, transform, optimizer, cosine_schedule(optimizer, 10), mode="pose",
                    device=torch.device("cpu"), epoch=0, clip_grad=1e-3, stop=stop, on_iteration=one_step)
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert records[0]["grad_norm"] > 1e-2  # the unclipped norm is what is logged
    assert step.norm().item() == pytest.approx(1e-3, rel=1e-4)


def test_train_one_epoch_checks_the_mode(synthetic_data):
    cfg, loader, transform = small_pose_setup(synthetic_data)
    model = PoseStream(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="mode 'rgb', but the model is a pose model"):
        train_one_epoch(model, loader, transform, optimizer, cosine_schedule(optimizer, 1), mode="rgb",
                        device=torch.device("cpu"), epoch=0)


def test_evaluate_deduplicates_by_index(synthetic_data):
    cfg = synthetic_data.tiny_config("unused", "pose").data
    dataset = synthetic_data.build_dataset(cfg, cfg.val_split, train=False, modalities=("pose",))
    loader = synthetic_data.build_loader(dataset, 5, train=False, seed=0, workers=0)
    batches = list(loader)

    class Repeating:  # yields every batch twice, as a padded distributed sampler would repeat clips
        sampler, batch_size = loader.sampler, 5

        def __iter__(self):
            return iter(batches + batches[:2])

        def __len__(self):
            return len(batches) + 2

    torch.manual_seed(0)
    model = PoseStream(3).eval()
    transform = synthetic_data.BatchTransform(cfg, ("pose",))
    result = evaluate(model, Repeating(), transform, mode="pose", device=torch.device("cpu"))
    np.testing.assert_array_equal(result.indices, np.arange(len(dataset)))
    with torch.no_grad():
        direct = torch.cat([model(transform(b, "cpu")[1]) for b in batches]).numpy()
    np.testing.assert_allclose(result.logits["pose"], direct, rtol=1e-6, atol=1e-6)
    labels = np.concatenate([b["label"].numpy() for b in batches])
    assert result.metrics == stream_metrics({"pose": direct}, labels)
    assert result.primary == "pose" and result.confusion().sum() == len(dataset)


def test_epamnet_stage_learns_above_chance_and_writes_its_records(tmp_path, synthetic_data, capsys):
    cfg = synthetic_data.tiny_config(tmp_path, "epamnet", ["train.epochs=3", "train.checkpoint_every_iters=5",
                                                         "train.keep_checkpoints=1"])
    result = run(cfg)
    assert not result.stopped
    stage = result.stages["epamnet"]
    chance = 1 / synthetic_data.NUM_CLASSES
    assert stage.primary == "summed" and stage.metrics["summed"]["top1"] >= chance + 0.3, stage.metrics
    assert set(stage.metrics) == {"rgb", "pose", "summed"}

    folder = tmp_path / "epamnet"
    for name in ("final.pt", "log.jsonl", "latest", "config.toml", "environment.json", "metrics.json",
                 "per_class.txt", "curves.png", "confusion.png"):
        assert (folder / name).is_file(), name
    for name in ("config.toml", "environment.json", "summary.json"):
        assert (tmp_path / name).is_file(), name
    iterations = 3 * 24 // 2
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, iterations + 1))
    assert all({"loss", "loss_rgb", "loss_pose", "lr", "clips_per_s", "grad_norm"} <= set(r) for r in train)
    assert train[0]["lr"] == pytest.approx(0.02 * 2 / 16)
    assert [r["epoch"] for r in records if r["type"] == "eval"] == [1, 2, 3]
    # every epoch's checkpoint, and only the newest step checkpoint
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == [
        "epoch_001.pt", "epoch_002.pt", "epoch_003.pt", "step_00000035.pt"]
    assert json.loads((folder / "latest").read_text())["checkpoint"] == "checkpoints/epoch_003.pt"
    assert config_from_dict(tomllib.loads((tmp_path / "config.toml").read_text())) == cfg
    environment = json.loads((tmp_path / "environment.json").read_text())
    assert environment["torch"] == str(torch.__version__) and "epamx" in environment
    final = load_checkpoint(folder / "final.pt")
    assert final["meta"]["mode"] == "epamnet" and final["meta"]["class_names"] == ["action_0", "action_1", "action_2"]
    assert json.loads((tmp_path / "summary.json").read_text())["stages"]["epamnet"]["metrics"] == stage.metrics
    out = capsys.readouterr().out
    assert "[epamnet] held-out top1 (summed)" in out and f"Everything is in {tmp_path}" in out

    # run again: the complete stage is not trained twice
    again = run(cfg)
    assert again.stages["epamnet"].metrics == stage.metrics
    assert "already complete" in capsys.readouterr().out


def test_the_three_stage_protocol(tmp_path, synthetic_data, capsys):
    cfg = synthetic_data.tiny_config(tmp_path, "all", ["train.epochs=1"])
    result = run(cfg)
    assert list(result.stages) == ["pose", "rgb", "epamnet"]
    out = capsys.readouterr().out
    pose_final, rgb_final = tmp_path / "pose" / "final.pt", tmp_path / "rgb" / "final.pt"
    for final, parts in ((pose_final, "pose_backbone, pose_cls_head"), (rgb_final, "rgb_backbone, rgb_cls_head")):
        (line,) = [line for line in out.splitlines() if line.startswith("[epamnet]") and str(final) in line]
        assert parts in line, line
    for mode in ("pose", "rgb", "epamnet"):
        assert f"[{mode}] held-out top1" in out
        assert load_checkpoint(tmp_path / mode / "final.pt")["meta"]["mode"] == mode
    assert set(result.stages["pose"].metrics) == {"pose"} and set(result.stages["rgb"].metrics) == {"rgb"}


def test_a_finished_run_is_not_overwritten_without_resume(tmp_path, synthetic_data):
    cfg = synthetic_data.tiny_config(tmp_path, "pose", ["train.epochs=1", "train.resume=false"])
    stop = StopFlag()
    run_stage(cfg, "pose", on_iteration=lambda record: stop.request(), stop=stop)
    with pytest.raises(FileExistsError, match="already holds a run.*train.resume=true"):
        run_stage(cfg, "pose")


def test_model_num_classes_goes_to_the_dataset(tmp_path, synthetic_data):
    cfg = synthetic_data.tiny_config(tmp_path, "pose", ["model.num_classes=2"])
    with pytest.raises(ValueError, match="label 2 >= num_classes = 2"):
        run_stage(cfg, "pose")
    cfg = synthetic_data.tiny_config(tmp_path, "pose", ["model.num_classes=5", "train.epochs=1"])
    stop = StopFlag()
    result = run_stage(cfg, "pose", on_iteration=lambda record: stop.request(), stop=stop)
    assert load_checkpoint(result.resume_from)["meta"]["num_classes"] == 5


def test_pose_channels_must_match_the_skeleton(tmp_path, synthetic_data, monkeypatch):
    monkeypatch.setattr(synthetic_data.BatchTransform, "num_joints", 25, raising=False)
    cfg = synthetic_data.tiny_config(tmp_path, "pose")
    with pytest.raises(ValueError, match="model.pose_channels = 17, but data.skeleton 'coco17' renders 25"):
        run_stage(cfg, "pose")


def test_a_diverged_loss_stops_training_with_the_step(synthetic_data):
    cfg, loader, transform = small_pose_setup(synthetic_data)
    model = PoseStream(3)
    with torch.no_grad():
        model.pose_cls_head.fc_cls.bias.fill_(float("nan"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 1, iteration 1 \(step 1\)"):
        train_one_epoch(model, loader, transform, optimizer, cosine_schedule(optimizer, 10), mode="pose",
                        device=torch.device("cpu"), epoch=0)


def test_a_run_folder_from_before_the_stage_had_its_name_is_explained(tmp_path, synthetic_data):
    """A run folder whose EPAM-Net stage is in fused/ (its old name): resuming it says how, nothing is trained."""
    (tmp_path / "fused" / "checkpoints").mkdir(parents=True)
    cfg = synthetic_data.tiny_config(tmp_path, "epamnet")
    with pytest.raises(CheckpointError, match=r"fused holds an EPAM-Net stage .* rename it to .*epamnet"):
        run_stage(cfg, "epamnet")
    assert not (tmp_path / "epamnet").exists()


def test_tensorboard_gets_what_the_json_log_gets(tmp_path, synthetic_data):
    pytest.importorskip("tensorboard", reason="train.tensorboard needs the optional tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = synthetic_data.tiny_config(tmp_path, "pose", ["train.epochs=2", "train.tensorboard=true"])
    run_stage(cfg, "pose")
    records = [json.loads(line) for line in (tmp_path / "pose" / "log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "pose" / "tensorboard"))
    events.Reload()
    train = [r for r in records if r["type"] == "train"]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in train]
    np.testing.assert_allclose([e.value for e in loss], [r["loss"] for r in train], rtol=1e-6)
    assert {"train/lr", "train/clips_per_s", "train/grad_norm", "train/loss_pose"} <= set(events.Tags()["scalars"])
    top1 = events.Scalars("held_out/top1/pose")
    assert [e.value for e in top1] == pytest.approx([r["metrics"]["pose"]["top1"] for r in records
                                                     if r["type"] == "eval"])


def test_tensorboard_without_the_package_is_a_config_error(tmp_path, synthetic_data, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    cfg = synthetic_data.tiny_config(tmp_path, "pose", ["train.tensorboard=true"])
    with pytest.raises(ConfigError, match="train.tensorboard = true needs the tensorboard package"):
        run_stage(cfg, "pose")
