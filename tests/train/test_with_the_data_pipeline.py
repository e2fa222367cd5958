"""The training layer on the real data pipeline (epamx.data's embedded dataset, tiny), not the stand-in: the
interfaces fit, and a stopped and resumed stage still ends bit for bit where an uninterrupted one does."""
import os
import signal

import torch

from epamx.config import load_config
from epamx.train import run_stage
from epamx.train.checkpoint import load_checkpoint


def tiny_embedded(tmp_path, name):
    # 12 classes x 2 clips: 24 training clips, 6 iterations of 4; 12 held-out clips
    return load_config("embedded", [
        f"data.cache_dir={tmp_path / 'cache'}", "data.embedded.train_per_class=2", "data.embedded.val_per_class=1",
        "data.embedded.frames=24", "data.clip_len=12", "data.frame_size=32", "data.heatmap_size=8",
        "data.embedded.image_size=32", f"train.out_dir={tmp_path / name}", "train.epochs=2", "train.workers=0",
        "train.batch_size=4", "train.progress=false", "train.deterministic=true", "train.checkpoint_every_iters=4"])


def test_a_stage_on_the_embedded_dataset_resumes_exactly(tmp_path):
    whole = run_stage(tiny_embedded(tmp_path, "whole"), "epamnet")
    assert set(whole.metrics) == {"rgb", "pose", "summed"}
    assert load_checkpoint(whole.final_checkpoint)["meta"]["num_classes"] == 12

    cfg = tiny_embedded(tmp_path, "parts")

    def sigint_at_step_5(record):
        if record["step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)

    assert run_stage(cfg, "epamnet", on_iteration=sigint_at_step_5).stopped
    resumed = run_stage(cfg, "epamnet")
    a = load_checkpoint(whole.final_checkpoint)["model"]
    b = load_checkpoint(resumed.final_checkpoint)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics == whole.metrics
