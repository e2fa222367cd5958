"""Evaluating a model on a held-out split: every clip's logits (gathered over ranks under torchrun) and their
metrics, from a model in memory (``evaluate``, what training calls) or from a checkpoint (``evaluate_checkpoint``,
what ``epamx eval`` calls)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from epamx import distributed as D
from epamx.config import Config
from epamx.errors import CheckpointError
from epamx.inference.inputs import build_batch_transform
from epamx.inference.loading import LoadedModel, resolve_channels_last
from epamx.inference.metrics import SUMMED, confusion_matrix, per_class_table, stream_metrics
from epamx.models.streams import modalities, model_mode, stream_logits

__all__ = ["Evaluation", "evaluate", "evaluate_checkpoint", "progress_bar", "resolve_amp", "rng_untouched"]


@dataclass
class Evaluation:
    """Every held-out clip's logits, de-duplicated across ranks and sorted by dataset index, and their metrics.

    ``logits``: {'rgb': (N, C), 'pose': (N, C)} (the model's streams) plus 'summed' (their sum, EPAM-Net's
    prediction) for EPAM-Net; ``metrics``: {stream: {'top1', 'top5', 'mean_class_accuracy'}}; ``primary``:
    'summed', or the one stream.
    """
    indices: np.ndarray
    labels: np.ndarray
    logits: Dict[str, np.ndarray]
    metrics: Dict[str, Dict[str, float]]
    primary: str
    class_names: Optional[List[str]] = None

    @property
    def num_classes(self) -> int:
        return next(iter(self.logits.values())).shape[1]

    def confusion(self, stream: Optional[str] = None) -> np.ndarray:
        scores = self.logits[stream or self.primary]
        return confusion_matrix(scores.argmax(axis=1), self.labels, self.num_classes)

    def per_class_table(self, stream: Optional[str] = None) -> str:
        return per_class_table(self.confusion(stream), self.class_names)

    def summary(self) -> Dict[str, Any]:
        return {"num_samples": int(len(self.labels)), "primary": self.primary, "metrics": self.metrics}


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``train.amp`` on ``device``, or None for full precision."""
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


@contextlib.contextmanager
def rng_untouched():
    """Whatever runs inside (creating a DataLoader iterator draws its workers' base seed from torch's RNG) leaves
    torch's CPU RNG where it was."""
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    """A tqdm bar on rank 0 when ``enabled`` (None otherwise), cleared when it closes."""
    if not (enabled and D.is_main()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)


def _gather(indices: List[np.ndarray], labels: List[np.ndarray], logits: Dict[str, List[np.ndarray]]):
    """Every rank's clips, each once, sorted by dataset index: (indices, labels, {stream: logits})."""
    local = (np.concatenate(indices) if indices else np.zeros(0, np.int64),
             np.concatenate(labels) if labels else np.zeros(0, np.int64),
             {k: np.concatenate(v) for k, v in logits.items()})
    gathered = D.all_gather_objects(local)
    all_indices = np.concatenate([g[0] for g in gathered])
    if all_indices.size == 0:
        raise ValueError("evaluate: the loader yielded no clips")
    order = np.argsort(all_indices, kind="stable")
    unique = order[np.unique(all_indices[order], return_index=True)[1]]
    all_labels = np.concatenate([g[1] for g in gathered])[unique]
    streams = [k for k in ("rgb", "pose") if any(k in g[2] for g in gathered)]
    all_logits = {k: np.concatenate([g[2][k] for g in gathered if k in g[2]])[unique] for k in streams}
    return all_indices[unique], all_labels, all_logits


@torch.no_grad()
def evaluate(model: nn.Module, loader, transform, *, mode: Optional[str] = None, device: torch.device,
             channels_last: bool = False, amp_dtype: Optional[torch.dtype] = None, progress: bool = False,
             class_names: Optional[Sequence[str]] = None) -> Evaluation:
    """Logits of every clip of ``loader`` (one clip per video), gathered from all ranks with all_gather,
    de-duplicated by the batches' 'index', and top-1 / top-5 / mean class accuracy for each stream and for the
    summed prediction (rgb + pose logits). Every rank returns the same Evaluation.

    Runs the model outside DDP (ranks may hold different numbers of clips); under DDP, rank 0's batch-norm
    buffers are broadcast first, so every rank evaluates the weights that rank 0 saves.
    """
    D.broadcast_buffers(model)
    inner = D.unwrap(model)
    if mode is not None and model_mode(inner) != mode:
        raise ValueError(f"evaluate: mode {mode!r}, but the model is a {model_mode(inner)} model")
    was_training = inner.training
    inner.eval()
    loader.sampler.set_epoch(0)
    indices, labels, logits = [], [], {}
    bar = progress_bar(len(loader), "evaluate", progress)
    try:
        with rng_untouched():
            batches = iter(loader)
        for batch in batches:
            if batch is None:  # unreadable clips (data.skip_bad) are left out of the metrics
                continue
            imgs, heatmaps, target = transform(batch, device, channels_last)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = stream_logits(inner, imgs, heatmaps)
            for name, value in out.items():
                logits.setdefault(name, []).append(value.float().cpu().numpy())
            labels.append(target.cpu().numpy())
            indices.append(np.asarray(batch["index"]).astype(np.int64))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        inner.train(was_training)
    all_indices, all_labels, all_logits = _gather(indices, labels, logits)
    if len(all_logits) == 2:
        all_logits[SUMMED] = all_logits["rgb"] + all_logits["pose"]
    primary = SUMMED if SUMMED in all_logits else next(iter(all_logits))
    return Evaluation(all_indices, all_labels, all_logits, stream_metrics(all_logits, all_labels), primary,
                      list(class_names) if class_names is not None else None)


def evaluate_checkpoint(loaded: LoadedModel, split: Optional[str] = None, *, progress: bool = True) -> Evaluation:
    """Evaluate a loaded checkpoint on ``split`` (default the config's ``data.val_split``) of its config's dataset,
    one clip per video; under torchrun every rank evaluates its share."""
    from epamx.data import build_dataset, build_loader

    cfg: Config = loaded.config
    info = D.init_distributed(cfg.train.device)
    meta, mode = loaded.meta, loaded.mode
    recipe = cfg.stage(mode)
    dataset = build_dataset(cfg.data, split or cfg.data.val_split, train=False, modalities=modalities(mode),
                            num_classes=meta["num_classes"], progress=progress and info.is_main,
                            pipeline=recipe.pipeline)
    if int(dataset.num_classes) != meta["num_classes"]:
        raise CheckpointError(f"{loaded.checkpoint}: checkpoint has {meta['num_classes']} classes, the dataset "
                              f"{dataset.num_classes}")
    loader = build_loader(dataset, recipe.batch_size, train=False, seed=cfg.train.seed, workers=cfg.train.workers,
                          rank=info.rank, world_size=info.world_size, pin_memory=info.device.type == "cuda")
    transform = build_batch_transform(cfg, mode, info.device)
    return evaluate(loaded.optimized(), loader, transform, mode=mode, device=info.device,
                    channels_last=resolve_channels_last(cfg.model.channels_last, info.device),
                    amp_dtype=resolve_amp(recipe.amp, info.device), progress=progress,
                    class_names=loaded.class_names)
