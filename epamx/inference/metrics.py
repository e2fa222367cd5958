"""Classification metrics over a whole evaluation set: top-k accuracy, mean class accuracy, confusion matrix.

Scores are (N, C) arrays (logits or probabilities: only their order matters), labels (N,) class indices. Ties are
broken toward the lower class index, as ``argmax`` does. Accuracies are fractions in [0, 1].
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np

__all__ = ["SUMMED", "classification_metrics", "confusion_matrix", "mean_class_accuracy", "per_class_accuracy",
           "per_class_table", "stream_metrics", "topk_accuracy"]


# EPAM-Net's prediction: the RGB head's and the pose head's logits summed (equal weights).
SUMMED = "summed"


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _check(scores: np.ndarray, labels: np.ndarray) -> None:
    if scores.ndim != 2 or labels.ndim != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"expected scores (N, C) and labels (N,), got {scores.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise ValueError(f"labels must be in [0, {scores.shape[1]}), got values in [{labels.min()}, {labels.max()}]")


def topk_accuracy(scores, labels, k: int = 1) -> float:
    """The fraction of samples whose label is among the ``k`` highest scores (k clipped to the class count)."""
    scores, labels = _as_numpy(scores), _as_numpy(labels).astype(np.int64)
    _check(scores, labels)
    if labels.size == 0:
        return float("nan")
    k = max(1, min(int(k), scores.shape[1]))
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def confusion_matrix(predictions, labels, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    predictions, labels = _as_numpy(predictions).astype(np.int64), _as_numpy(labels).astype(np.int64)
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
    """Recall of each class from a confusion matrix; NaN for classes with no samples."""
    totals = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(matrix) / np.maximum(totals, 1), np.nan)


def mean_class_accuracy(scores, labels) -> float:
    """The mean over the classes present in ``labels`` of each class's top-1 accuracy (Toyota Smarthome's metric)."""
    scores, labels = _as_numpy(scores), _as_numpy(labels).astype(np.int64)
    _check(scores, labels)
    if labels.size == 0:
        return float("nan")
    matrix = confusion_matrix(scores.argmax(axis=1), labels, scores.shape[1])
    return float(np.nanmean(per_class_accuracy(matrix)))


def classification_metrics(scores, labels) -> Dict[str, float]:
    """{'top1', 'top5', 'mean_class_accuracy'} of one set of scores."""
    return {"top1": topk_accuracy(scores, labels, 1), "top5": topk_accuracy(scores, labels, 5),
            "mean_class_accuracy": mean_class_accuracy(scores, labels)}


def stream_metrics(logits: Mapping[str, np.ndarray], labels) -> Dict[str, Dict[str, float]]:
    """Metrics of each stream's logits, plus 'summed' (rgb + pose logits, EPAM-Net's prediction) when both exist."""
    result = {name: classification_metrics(scores, labels) for name, scores in logits.items()}
    if "rgb" in logits and "pose" in logits and SUMMED not in logits:
        result[SUMMED] = classification_metrics(_as_numpy(logits["rgb"]) + _as_numpy(logits["pose"]), labels)
    return result


def per_class_table(matrix: np.ndarray, class_names: Optional[Sequence[str]] = None) -> str:
    """A text table: class, samples, correct, accuracy, and the class it is most often mistaken for."""
    num_classes = matrix.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"per_class_table: {len(names)} class names for {num_classes} classes")
    accuracy = per_class_accuracy(matrix)
    width = max([len("class")] + [len(f"{i} {n}") for i, n in enumerate(names)])
    lines = [f"{'class':<{width}}  {'samples':>7}  {'correct':>7}  {'accuracy':>8}  most confused with",
             "-" * (width + 50)]
    for i, name in enumerate(names):
        row = matrix[i].copy()
        row[i] = 0
        confused = f"{names[int(row.argmax())]} ({int(row.max())})" if row.max() > 0 else "-"
        acc = "-" if np.isnan(accuracy[i]) else f"{100 * accuracy[i]:7.2f}%"
        lines.append(f"{f'{i} {name}':<{width}}  {int(matrix[i].sum()):>7}  {int(matrix[i, i]):>7}  {acc:>8}  "
                     f"{confused}")
    present = ~np.isnan(accuracy)
    total = int(matrix.sum())
    lines.append("-" * (width + 50))
    overall = f"{100 * np.trace(matrix) / total:7.2f}%" if total else "-"
    mean = f"{100 * np.nanmean(accuracy):7.2f}%" if present.any() else "-"
    lines.append(f"{'overall (top-1)':<{width}}  {total:>7}  {int(np.trace(matrix)):>7}  {overall:>8}")
    lines.append(f"{'mean class accuracy':<{width}}  {'':>7}  {'':>7}  {mean:>8}")
    return "\n".join(lines) + "\n"
