"""Two CPU processes under torchrun (gloo): only rank 0 prints and writes; the data is sharded so the two ranks
together see what one process with twice the batch sees; gradients averaged by DDP equal that one process's
(exactly, up to float summation order, for a model without batch norm); evaluation gathers every clip once."""
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import synthetic
from epamx.inference import evaluate, load_model
from epamx.train import run_stage

ROOT = Path(__file__).resolve().parents[2]


def torchrun(out_dir: Path, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("SYNTHETIC_KILL_AT_STEP", None)
    logs = out_dir / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--log-dir", str(logs), "--redirects", "3", str(Path(synthetic.__file__)), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    outputs = {}
    for rank in (0, 1):
        (folder,) = glob.glob(str(logs / "*" / "attempt_0" / str(rank)))
        outputs[rank] = (Path(folder, "stdout.log").read_text(), Path(folder, "stderr.log").read_text())
    assert result.returncode == 0, f"{result.stderr}\nrank 0: {outputs[0][1]}\nrank 1: {outputs[1][1]}"
    return outputs


def test_two_processes_train_a_stage_and_only_rank_0_writes(tmp_path, synthetic_data):
    outputs = torchrun(tmp_path, "stage", str(tmp_path), "epamnet", "train.epochs=1")
    # rank 1 prints nothing (Gloo's own C++ logging in some torch releases, 2.9 for one, aside)
    assert [line for line in outputs[1][0].splitlines() if not line.startswith("[Gloo] ")] == [], outputs[1][0]
    assert "[epamnet] epoch 1/1" in outputs[0][0] and "held-out top-1" in outputs[0][0]
    assert "SyncBatchNorm needs CUDA" in outputs[0][1] and "SyncBatchNorm" not in outputs[1][1]

    folder = tmp_path / "epamnet"
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    # 24 clips, 2 per process per iteration: 6 iterations, each logged once, at the lr of a total batch of 4
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert train[0]["lr"] == pytest.approx(0.02 * 4 / 16)
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["epoch_001.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epamnet", "logs", "weights.pt"]

    # the gathered evaluation is one process's evaluation of the saved weights, every clip once
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["num_samples"] == 24
    model, meta = load_model(folder / "final.pt")
    cfg = synthetic.tiny_config(tmp_path, "epamnet").data
    val = synthetic.build_dataset(cfg, cfg.val_split, train=False)
    single = evaluate(model, synthetic.build_loader(val, 5, train=False, seed=0, workers=0),
                      synthetic.BatchTransform(cfg), device=torch.device("cpu"))
    for stream, values in single.metrics.items():
        assert metrics["metrics"][stream] == pytest.approx(values)

    # one process with the same total batch sees the same clips in the same order, at the same learning rates;
    # without SyncBatchNorm (CPU) each rank normalises over 2 clips instead of 4, so losses only approximate
    one = run_stage(synthetic.tiny_config(tmp_path / "one", "epamnet", ["train.epochs=1", "train.batch_size=4"]),
                    "epamnet")
    single_train = [json.loads(line) for line in (one.out_dir / "log.jsonl").read_text().splitlines()
                    if json.loads(line)["type"] == "train"]
    assert [r["lr"] for r in single_train] == pytest.approx([r["lr"] for r in train], rel=1e-12)
    assert single_train[0]["loss"] == pytest.approx(train[0]["loss"], rel=0.1)


@pytest.fixture(scope="module")
def one_node_bn_free(tmp_path_factory):
    """The BN-free stream's weights after one DDP epoch on one node with two processes (torchrun --standalone)."""
    folder = tmp_path_factory.mktemp("one_node")
    torchrun(folder, "bn-free", str(folder))
    return torch.load(folder / "bn_free.pt", weights_only=True)


def test_ddp_gradients_equal_one_process_with_the_total_batch(one_node_bn_free, synthetic_data):
    ddp = one_node_bn_free
    single = synthetic.train_bn_free(batch_size=4).state_dict()
    initial = synthetic.bn_free_stream().state_dict()
    for key, value in single.items():
        assert not torch.equal(value, initial[key]), f"{key} did not train"
        torch.testing.assert_close(ddp[key], value, rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_equal_one_machine_with_two_processes(tmp_path, one_node_bn_free, synthetic_data):
    """Two one-process "nodes" joined by torchrun's c10d rendezvous on the loopback address, as two machines would
    be (README: Training on several machines), train the same weights as one node with two processes."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "two_nodes"
    out.mkdir()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "epamx-test",
                               "--log-dir", str(out / f"logs{node}"), "--redirects", "3",
                               str(Path(synthetic.__file__)), "bn-free", str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    results = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), results
    two_nodes = torch.load(out / "bn_free.pt", weights_only=True)
    assert two_nodes.keys() == one_node_bn_free.keys()
    for key, value in one_node_bn_free.items():
        assert torch.equal(two_nodes[key], value), key
