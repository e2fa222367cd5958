"""A stage's per-iteration and per-evaluation records: the JSON-lines log, and TensorBoard when asked for.

Both are fed from the same hook (``StageLog.write``), on rank 0 only. A record is a dict with ``type`` "train"
(epoch, iter, step, loss, loss_<stream>, lr, grad_norm, clips_per_s, data_s) or "eval" (epoch, step, metrics:
{stream: {top1, top5, mean_class_accuracy}}).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from epamx.errors import ConfigError
from epamx.records import JsonLog

__all__ = ["StageLog"]

_TRAIN_SCALARS = ("loss", "lr", "grad_norm", "clips_per_s", "data_s")


class StageLog:
    """``folder/log.jsonl`` and, with ``tensorboard``, event files in ``folder/tensorboard``. Reopened after a
    resume (``keep_until_step``), both drop what a killed run wrote after its last checkpoint."""

    def __init__(self, folder: Path, keep_until_step: Optional[int], enabled: bool, tensorboard: bool = False):
        self.json = JsonLog(Path(folder) / "log.jsonl", keep_until_step, enabled)
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError("train.tensorboard = true needs the tensorboard package: pip install "
                                  "'epamx[tensorboard]' (or set train.tensorboard = false)") from exc
            purge = None if keep_until_step is None else keep_until_step + 1
            self.writer = SummaryWriter(str(Path(folder) / "tensorboard"), purge_step=purge)

    def write(self, record: Dict[str, Any]) -> None:
        self.json.write(record)
        if self.writer is None:
            return
        step = record["step"]
        if record.get("type") == "train":
            for key, value in record.items():
                if key in _TRAIN_SCALARS or key.startswith("loss_"):
                    self.writer.add_scalar(f"train/{key}", value, step)
        elif record.get("type") == "eval":
            for stream, metrics in record["metrics"].items():
                for name, value in metrics.items():
                    self.writer.add_scalar(f"held_out/{name}/{stream}", value, step)
            self.writer.flush()

    def close(self) -> None:
        self.json.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
