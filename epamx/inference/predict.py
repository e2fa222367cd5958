"""Top-k classes of chosen clips (``epamx predict``)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from epamx.config import Config
from epamx.data import ClipDataset
from epamx.inference.inputs import build_batch_transform, clip_batch
from epamx.inference.onnx_model import OnnxModel
from epamx.models.streams import model_mode, stream_logits

__all__ = ["predict"]


def _streams(model: Union[torch.nn.Module, OnnxModel]) -> Tuple[str, Callable[[Optional[Tensor], Optional[Tensor]],
                                                                              Dict[str, Tensor]]]:
    """The model's mode and its {stream: logits} function."""
    if isinstance(model, OnnxModel):
        return model.mode, model.stream_logits
    return model_mode(model), lambda imgs, heatmaps: stream_logits(model, imgs, heatmaps)


@torch.no_grad()
def predict(model: Union[torch.nn.Module, OnnxModel], cfg: Config, dataset: ClipDataset, top_k: int = 5,
            batch_size: int = 8, device: torch.device = torch.device("cpu")) -> List[Dict[str, Any]]:
    """Top-k classes of every clip of ``dataset``: [{'frame_dir', 'top': [(class, score), ...], 'streams':
    {stream: top class}, 'person_detected'}], scores the softmax of the summed logits (rgb + pose) or of the
    single stream's; 'person_detected' is False for a clip whose keypoints all have score 0 (its prediction rests on
    the frames alone). ``model`` may be an exported ONNX file's :class:`OnnxModel` (run with ONNX Runtime)."""
    mode, logits_of = _streams(model)
    transform = build_batch_transform(cfg, mode, device)
    names = dataset.class_names
    results = []
    for start in range(0, len(dataset), batch_size):
        indices = list(range(start, min(start + batch_size, len(dataset))))
        batch, (imgs, heatmaps, _) = clip_batch(transform, dataset, indices, device)
        logits = logits_of(imgs, heatmaps)
        probs = sum(logits.values()).float().softmax(-1)
        scores, classes = probs.topk(min(top_k, probs.shape[1]), dim=1)
        for i, frame_dir in enumerate(batch["frame_dir"]):
            ann = dataset.annotations[int(batch["index"][i])]
            results.append({
                "frame_dir": frame_dir,
                "top": [(names[c], round(float(s), 4)) for c, s in zip(classes[i].tolist(), scores[i].tolist())],
                "streams": {s: names[int(v[i].argmax())] for s, v in logits.items()},
                "person_detected": bool((ann["keypoint_score"] > 0).any()),
            })
    return results
