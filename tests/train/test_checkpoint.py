"""Checkpoints: atomic (a crash mid-write leaves the previous one intact), weights-only (a code-running pickle is
refused and does not run), RNG states restored exactly, clear errors."""
import os
import pickle
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from epamx.train import checkpoint as C


def state(value: float):
    return {"meta": {"mode": "pose", "num_classes": 3}, "model": {"w": torch.full((4, 4), value)}, "step": int(value)}


def test_round_trip_and_latest(tmp_path):
    path = C.save_checkpoint(state(1.0), tmp_path / "checkpoints" / "a.pt", folder=tmp_path)
    assert C.latest_checkpoint(tmp_path) == path
    loaded = C.load_checkpoint(path)
    assert loaded["format"] == C.FORMAT and loaded["step"] == 1
    assert torch.equal(loaded["model"]["w"], torch.ones(4, 4))
    assert C.latest_checkpoint(tmp_path / "nowhere") is None


def test_rng_states_are_restored_exactly():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # leaves a cached Gaussian in NumPy's state
    random.gauss(0, 1)  # and in Python's
    saved = C.capture_rng_state()
    first = (torch.rand(5), np.random.normal(size=5), [random.gauss(0, 1) for _ in range(3)], random.random())
    # through a file, to prove the state survives weights-only loading without any allow-listed type
    buffer = __import__("io").BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    C.restore_rng_state(torch.load(buffer, weights_only=True))
    again = (torch.rand(5), np.random.normal(size=5), [random.gauss(0, 1) for _ in range(3)], random.random())
    assert torch.equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert first[2:] == again[2:]


def test_failure_before_the_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    C.save_checkpoint(state(1.0), tmp_path / "ck.pt", folder=tmp_path)

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(C.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        C.save_checkpoint(state(2.0), tmp_path / "ck.pt", folder=tmp_path)
    monkeypatch.undo()
    assert C.load_checkpoint(C.latest_checkpoint(tmp_path))["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "latest"]  # the temporary file is gone


def test_a_process_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    """A real crash: the second save SIGKILLs its own process after writing half of the new file's bytes."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        from epamx.train import checkpoint as C
        folder = {str(tmp_path)!r}
        C.save_checkpoint({{"step": 1, "w": torch.ones(1000)}}, folder + "/ck.pt", folder=folder)
        real_fdopen = os.fdopen
        class Torn:
            def __init__(self, f): self.f = f
            def __enter__(self): return self
            def __exit__(self, *exc): return False
            def write(self, data):
                self.f.write(data[: len(data) // 2]); self.f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        C.os.fdopen = lambda fd, mode: Torn(real_fdopen(fd, mode))
        C.save_checkpoint({{"step": 2, "w": torch.zeros(1000)}}, folder + "/ck.pt", folder=folder)
        print("not reached")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    assert "not reached" not in result.stdout
    latest = C.latest_checkpoint(tmp_path)
    assert latest == tmp_path / "ck.pt"
    loaded = C.load_checkpoint(latest)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(1000))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ck.pt.")  # the torn temporary, never read


def test_a_torn_file_is_an_error_naming_it(tmp_path):
    path = C.save_checkpoint(state(1.0), tmp_path / "ck.pt")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(C.CheckpointError, match=str(path)):
        C.load_checkpoint(path)


class Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_code_running_pickle_is_refused_and_does_not_run(tmp_path, synthetic_data):
    marker = tmp_path / "marker"
    evil = tmp_path / "run" / "epamnet" / "checkpoints" / "step_00000001.pt"
    evil.parent.mkdir(parents=True)
    torch.save({"format": C.FORMAT, "meta": {}, "model": {"w": torch.zeros(1)}, "x": Payload(marker)}, evil)
    # the payload is live: a plain unpickler runs it
    pickle.loads(pickle.dumps(Payload(tmp_path / "proof")))
    assert (tmp_path / "proof").read_text() == "pwned"

    with pytest.raises(C.CheckpointError, match="weights-only") as err:
        C.load_checkpoint(evil)
    assert str(evil) in str(err.value)
    assert not marker.exists()

    from epamx.models import EPAMNet, init_from

    with pytest.raises(ValueError, match=str(evil)):
        init_from(EPAMNet(3), [evil])
    assert not marker.exists()

    # and as the checkpoint a run would resume from
    C.write_latest(evil.parent.parent, evil)
    from epamx.train import run_stage

    cfg = synthetic_data.tiny_config(tmp_path / "run", "epamnet")
    with pytest.raises(C.CheckpointError, match=str(evil)):
        run_stage(cfg, "epamnet")
    assert not marker.exists()


def test_objects_that_would_not_load_back_are_never_written(tmp_path):
    with pytest.raises(C.CheckpointError, match="weights_only"):
        C.save_checkpoint({"x": Payload(tmp_path / "m")}, tmp_path / "ck.pt")
    assert not (tmp_path / "ck.pt").exists() and not list(tmp_path.iterdir())


def test_compatibility_errors_name_the_file_and_the_difference(tmp_path):
    path = tmp_path / "ck.pt"
    checkpoint = {"meta": {"mode": "rgb", "num_classes": 60, "pose_channels": 17}}
    with pytest.raises(C.CheckpointError) as err:
        C.check_compatible(checkpoint, path, mode="epamnet", num_classes=120, pose_channels=17)
    assert str(path) in str(err.value)
    assert "checkpoint has 60 classes, model 120" in str(err.value)
    assert "checkpoint's mode is 'rgb', this run's 'epamnet'" in str(err.value)
    C.check_compatible(checkpoint, path, mode="rgb", num_classes=60)


def test_not_an_epamx_checkpoint(tmp_path):
    path = tmp_path / "authors.pth"
    torch.save({"model_state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(C.CheckpointError, match="not an epamx training checkpoint.*init_from"):
        C.load_checkpoint(path)


def test_latest_naming_a_missing_file(tmp_path):
    C.write_latest(tmp_path, tmp_path / "gone.pt")
    with pytest.raises(C.CheckpointError, match="gone.pt, which does not exist"):
        C.latest_checkpoint(tmp_path)


def test_prune_keeps_the_newest_and_the_protected(tmp_path):
    for step in (1, 2, 3, 4):
        (tmp_path / f"step_{step:08d}.pt").write_bytes(b"x")
    (tmp_path / "epoch_001.pt").write_bytes(b"x")
    deleted = C.prune_checkpoints(tmp_path, "step_*.pt", keep=2, protect=tmp_path / "step_00000001.pt")
    assert [p.name for p in deleted] == ["step_00000002.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_001.pt", "step_00000001.pt", "step_00000003.pt",
                                                          "step_00000004.pt"]


def test_fsync_of_the_folder_is_attempted(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(C.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    C.atomic_write_bytes(tmp_path / "f", b"data")
    assert len(synced) == 2  # the file, then its folder
    assert (tmp_path / "f").read_bytes() == b"data"
