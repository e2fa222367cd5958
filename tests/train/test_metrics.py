"""Metrics against a hand-worked example, and the plots drawn from them."""
import json

import numpy as np
import pytest
import torch

from epamx.inference.metrics import (
    classification_metrics,
    confusion_matrix,
    mean_class_accuracy,
    per_class_accuracy,
    per_class_table,
    stream_metrics,
    topk_accuracy,
)

# 6 clips, 4 classes. Ranked classes per row (best first) and the label:
#   0: 0 1 2 3  label 0  -> top-1 hit
#   1: 2 1 0 3  label 1  -> top-2 hit
#   2: 3 2 1 0  label 2  -> top-2 hit
#   3: 1 0 2 3  label 3  -> rank 4
#   4: 0 3 2 1  label 0  -> top-1 hit
#   5: 1 2 3 0  label 1  -> top-1 hit
SCORES = np.array([
    [0.9, 0.5, 0.3, 0.1],
    [0.3, 0.5, 0.9, 0.1],
    [0.1, 0.3, 0.5, 0.9],
    [0.5, 0.9, 0.3, 0.1],
    [0.9, 0.1, 0.3, 0.5],
    [0.1, 0.9, 0.5, 0.3],
], dtype=np.float32)
LABELS = np.array([0, 1, 2, 3, 0, 1])


def test_topk_by_hand():
    assert topk_accuracy(SCORES, LABELS, 1) == pytest.approx(3 / 6)
    assert topk_accuracy(SCORES, LABELS, 2) == pytest.approx(5 / 6)
    assert topk_accuracy(SCORES, LABELS, 3) == pytest.approx(5 / 6)
    assert topk_accuracy(SCORES, LABELS, 4) == 1.0
    assert topk_accuracy(SCORES, LABELS, 5) == 1.0  # k clipped to the 4 classes


def test_confusion_and_mean_class_by_hand():
    # predictions (argmax): 0, 2, 3, 1, 0, 1
    expected = np.array([[2, 0, 0, 0],   # class 0: both right
                         [0, 1, 1, 0],   # class 1: one right, one taken for 2
                         [0, 0, 0, 1],   # class 2: taken for 3
                         [0, 1, 0, 0]])  # class 3: taken for 1
    matrix = confusion_matrix(SCORES.argmax(1), LABELS, 4)
    np.testing.assert_array_equal(matrix, expected)
    np.testing.assert_allclose(per_class_accuracy(matrix), [1.0, 0.5, 0.0, 0.0])
    assert mean_class_accuracy(SCORES, LABELS) == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    metrics = classification_metrics(torch.from_numpy(SCORES), torch.from_numpy(LABELS))
    assert metrics == pytest.approx({"top1": 0.5, "top5": 1.0, "mean_class_accuracy": 0.375})


def test_mean_class_accuracy_ignores_absent_classes():
    scores = np.eye(5)[[0, 0, 1]] * 2  # classes 2-4 never occur
    labels = np.array([0, 1, 1])        # class 0: 1/1, class 1: 1/2
    assert mean_class_accuracy(scores, labels) == pytest.approx(0.75)
    assert np.isnan(per_class_accuracy(confusion_matrix([0, 0, 1], labels, 5))[3])


def test_ties_go_to_the_lower_class():
    scores = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    assert topk_accuracy(scores, np.array([0, 1]), 1) == 1.0
    assert topk_accuracy(scores, np.array([1, 2]), 1) == 0.0


def test_stream_metrics_adds_the_summed_scores():
    rgb = np.array([[2.0, 0.0], [0.0, 1.0]])
    pose = np.array([[0.0, 3.0], [0.0, 1.0]])
    labels = np.array([1, 1])
    result = stream_metrics({"rgb": rgb, "pose": pose}, labels)
    assert result["rgb"]["top1"] == 0.5 and result["pose"]["top1"] == 1.0
    assert result["summed"]["top1"] == 1.0  # [2, 3] and [0, 2]
    assert set(stream_metrics({"pose": pose}, labels)) == {"pose"}


def test_bad_shapes_and_labels():
    with pytest.raises(ValueError, match="expected scores"):
        topk_accuracy(SCORES, LABELS[:3])
    with pytest.raises(ValueError, match="labels must be in"):
        topk_accuracy(SCORES, np.array([0, 1, 2, 3, 4, 0]))


def test_per_class_table():
    table = per_class_table(confusion_matrix(SCORES.argmax(1), LABELS, 4), ["walk", "sit", "jump", "wave"])
    lines = table.splitlines()
    assert lines[2].split() == ["0", "walk", "2", "2", "100.00%", "-"]
    assert lines[3].split() == ["1", "sit", "2", "1", "50.00%", "jump", "(1)"]
    assert lines[5].split() == ["3", "wave", "1", "0", "0.00%", "sit", "(1)"]
    assert "50.00%" in lines[-2] and "37.50%" in lines[-1]
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        per_class_table(np.zeros((4, 4), int), ["a", "b", "c"])


def test_plots_write_pngs(tmp_path):
    from epamx.plots import plot_confusion_matrix, plot_training_curves

    log = tmp_path / "log.jsonl"
    records = [{"type": "train", "epoch": 0, "iter": i, "step": i, "loss": 2.0 / i, "loss_rgb": 1.0 / i,
                "loss_pose": 1.0 / i, "lr": 0.01 * (1 - i / 20)} for i in range(1, 21)]
    records.append({"type": "eval", "epoch": 1, "step": 20,
                    "metrics": {"rgb": {"top1": 0.5}, "pose": {"top1": 0.6}, "summed": {"top1": 0.7}}})
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"type": "train", "ste')  # torn last line
    for path in (plot_training_curves(log, tmp_path / "curves.png"),
                 plot_confusion_matrix(confusion_matrix(SCORES.argmax(1), LABELS, 4), tmp_path / "cm.png",
                                       ["walk", "sit", "jump", "wave"])):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
