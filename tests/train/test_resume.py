"""Kill and resume: a run stopped (SIGINT at an iteration boundary, or SIGKILL at any moment) and resumed ends with
the same weights, bit for bit on a CPU, as the same run uninterrupted."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import synthetic
from epamx.train import run_stage
from epamx.train.checkpoint import latest_checkpoint, load_checkpoint

# 24 clips, batch 2: 12 iterations per epoch, 24 in all; a step checkpoint every 5.
OVERRIDES = ["train.epochs=2", "train.checkpoint_every_iters=5"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as mp:
        synthetic.install(mp)
        result = run_stage(synthetic.tiny_config(out, "epamnet", OVERRIDES), "epamnet")
    torch.set_num_threads(threads)
    return result


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def log_without_timings(path):
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("clips_per_s", "data_s")} for r in records]


def sigint_at(step):
    def on_iteration(record):
        if record["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)  # the real handler: sets the flag, the loop saves and returns
    return on_iteration


def test_stopped_twice_and_resumed_equals_uninterrupted(tmp_path, synthetic_data, uninterrupted, capsys):
    cfg = synthetic_data.tiny_config(tmp_path, "epamnet", OVERRIDES)
    handler = signal.getsignal(signal.SIGINT)
    first = run_stage(cfg, "epamnet", on_iteration=sigint_at(7))  # mid-epoch, between step checkpoints
    assert first.stopped and first.resume_from.name == "step_00000007.pt"
    out = capsys.readouterr()
    assert "SIGINT" in out.err and str(first.resume_from) in out.out and "train.resume = true" in out.out
    assert signal.getsignal(signal.SIGINT) is handler  # ours is uninstalled
    second = run_stage(cfg, "epamnet", on_iteration=sigint_at(12))  # the last iteration of the first epoch
    assert second.stopped
    assert load_checkpoint(second.resume_from)["iter"] == 12
    final = run_stage(cfg, "epamnet")
    assert not final.stopped
    assert_same_weights(load_checkpoint(final.final_checkpoint)["model"],
                        load_checkpoint(uninterrupted.final_checkpoint)["model"])
    assert final.metrics == uninterrupted.metrics
    assert log_without_timings(tmp_path / "epamnet" / "log.jsonl") == log_without_timings(
        uninterrupted.out_dir / "log.jsonl")


def test_sigkill_at_any_moment_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    """A separate process is killed with SIGKILL (no handler runs) 3 iterations after its last checkpoint; the
    resumed run repeats those iterations from the checkpoint and still ends where the uninterrupted run does."""
    script = Path(synthetic.__file__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")]),
           "SYNTHETIC_KILL_AT_STEP": "18"}
    command = [sys.executable, str(script), "stage", str(tmp_path), "epamnet", *OVERRIDES]
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert latest_checkpoint(tmp_path / "epamnet").name == "step_00000015.pt"
    steps = [r["step"] for r in log_without_timings(tmp_path / "epamnet" / "log.jsonl") if r["type"] == "train"]
    assert steps[-1] == 18  # it did run past the checkpoint before dying

    env["SYNTHETIC_KILL_AT_STEP"] = "0"
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "step_00000015.pt" in resumed.stdout
    assert_same_weights(torch.load(tmp_path / "weights.pt", weights_only=True),
                        load_checkpoint(uninterrupted.final_checkpoint)["model"])
    assert log_without_timings(tmp_path / "epamnet" / "log.jsonl") == log_without_timings(
        uninterrupted.out_dir / "log.jsonl")


def test_resume_refuses_another_model(tmp_path, synthetic_data):
    cfg = synthetic_data.tiny_config(tmp_path, "pose", ["train.epochs=1"])
    stop_early = sigint_at(1)
    assert run_stage(cfg, "pose", tmp_path / "stage", on_iteration=stop_early).stopped
    with pytest.raises(ValueError, match=r"checkpoint's mode is 'pose', this run's 'rgb'"):
        run_stage(cfg, "rgb", tmp_path / "stage")
    other = synthetic_data.tiny_config(tmp_path, "pose", ["train.epochs=1", "train.batch_size=3"])
    with pytest.raises(ValueError, match=r"checkpoint's batch_size is 2, this run's 3"):
        run_stage(other, "pose", tmp_path / "stage")
