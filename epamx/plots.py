"""PNG figures: training curves from a stage's JSON-lines log, confusion matrices (matplotlib, Agg), and the
matplotlib set-up every figure of epamx uses (``pyplot``, ``save_figure``)."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

__all__ = ["plot_confusion_matrix", "plot_training_curves", "pyplot", "read_log", "save_figure"]

PathLike = Union[str, os.PathLike]


def pyplot():
    """matplotlib.pyplot on the Agg backend (no screen needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_path: PathLike, dpi: int = 100) -> Path:
    """Lay out, write atomically (creating the folder; the format from the file's suffix) and close a figure."""
    from epamx.records import atomic_write_bytes

    fig.tight_layout()
    out_path = Path(out_path)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, dpi=dpi, format=out_path.suffix.lstrip(".") or "png")
    finally:
        pyplot().close(fig)
    return atomic_write_bytes(out_path, buffer.getvalue())


def read_log(path: PathLike) -> List[Dict]:
    """The records of a JSON-lines log (a torn last line, from a killed run, is skipped)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < 2 or window <= 1:
        return values
    window = min(window, len(values))
    kernel = np.ones(window) / window
    head = np.cumsum(values[:window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def plot_training_curves(log_path: PathLike, out_path: PathLike, title: Optional[str] = None) -> Path:
    """Loss (per iteration, with a moving average), learning rate, and held-out accuracy per evaluation."""
    plt = pyplot()
    records = read_log(log_path)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if train:
        steps = np.array([r["step"] for r in train])
        loss = np.array([r["loss"] for r in train], dtype=float)
        axes[0].plot(steps, loss, alpha=0.3, lw=0.8, label="loss")
        axes[0].plot(steps, _smooth(loss, max(1, len(loss) // 50)), lw=1.5, label="moving average")
        for stream in ("rgb", "pose"):
            if all(f"loss_{stream}" in r for r in train):
                values = np.array([r[f"loss_{stream}"] for r in train], dtype=float)
                axes[0].plot(steps, _smooth(values, max(1, len(values) // 50)), lw=1, label=f"{stream} (avg)")
        axes[1].plot(steps, [r["lr"] for r in train])
    axes[0].set(xlabel="iteration", ylabel="training loss", title="loss")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].set(xlabel="iteration", ylabel="learning rate", title="learning rate")
    if evals:
        for stream in evals[-1]["metrics"]:
            points = [(r["epoch"], 100 * r["metrics"][stream]["top1"]) for r in evals if stream in r["metrics"]]
            axes[2].plot(*zip(*points), marker="o", label=stream)
        axes[2].legend(loc="lower right", fontsize=8)
    axes[2].set(xlabel="epoch", ylabel="top-1 (%)", title="held-out top-1")
    axes[2].xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_path)


def plot_confusion_matrix(matrix: np.ndarray, out_path: PathLike, class_names: Optional[Sequence[str]] = None,
                          normalize: bool = True, title: Optional[str] = None) -> Path:
    """The confusion matrix (rows true, columns predicted), each row normalised to sum to 1 when ``normalize``."""
    plt = pyplot()
    matrix = np.asarray(matrix)
    num_classes = matrix.shape[0]
    shown = matrix.astype(float)
    if normalize:
        totals = shown.sum(axis=1, keepdims=True)
        shown = np.divide(shown, totals, out=np.zeros_like(shown), where=totals > 0)
    side = min(4 + 0.25 * num_classes, 30)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if num_classes <= 60:
        labels = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        ax.set_xticks(range(num_classes), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(num_classes), labels, fontsize=7)
    if num_classes <= 20:
        for i in range(num_classes):
            for j in range(num_classes):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if shown[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    return save_figure(fig, out_path)
