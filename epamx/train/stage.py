"""One training stage ("pose", "rgb" or "epamnet") of a config, as a short list of named steps:

    set-up (device, seeds) -> data -> model and optimiser -> resume -> records -> the epoch loop -> finish

Resuming is exact: every RNG, the optimiser, the schedule and the gradient scaler are restored from the
checkpoint, and the data continue with the batch they would have given (epamx.train.epoch). On a CPU with
``train.deterministic`` a resumed run ends with the same weights, bit for bit, as an uninterrupted one.

A stage folder holds: config.toml, environment.json, log.jsonl (and tensorboard/ with ``train.tensorboard``),
checkpoints/ with ``latest``, and once complete final.pt, metrics.json, per_class.txt, curves.png, confusion.png.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

import epamx
from epamx import distributed as D
from epamx.config import Config, StageSettings, to_toml
from epamx.errors import CheckpointError, DataError, RunExistsError
from epamx.inference.evaluation import Evaluation, evaluate, resolve_amp
from epamx.inference.inputs import build_batch_transform
from epamx.inference.loading import memory_format_name, resolve_channels_last
from epamx.models.streams import MODES, build_model, init_from as init_model_from, modalities
from epamx.records import atomic_write_text, environment_info, write_evaluation_report, write_json
from epamx.train.checkpoint import (
    capture_rng_state,
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from epamx.train.epoch import cosine_schedule, train_one_epoch
from epamx.train.signals import StopFlag, stop_on_signals
from epamx.train.stage_log import StageLog

__all__ = ["StageResult", "best_evaluation", "run_stage"]

Hook = Optional[Callable[[Dict[str, Any]], None]]


@dataclass
class StageResult:
    mode: str
    out_dir: Path
    final_checkpoint: Optional[Path]     # out_dir/final.pt once the stage is complete
    metrics: Dict[str, Dict[str, float]] = field(default_factory=dict)  # the last evaluation's
    primary: str = ""
    stopped: bool = False
    resume_from: Optional[Path] = None   # the checkpoint a stopped stage continues from
    epochs: int = 0                      # the last epoch, whose evaluation ``metrics`` is
    best: Optional[Dict[str, Any]] = None  # the best held-out evaluation: {"epoch", "step", "metric", "metrics"}

    def headline(self, metric: str = "top1") -> float:
        """The last epoch's held-out ``metric`` of the primary prediction (the headline)."""
        return self.metrics.get(self.primary, {}).get(metric, float("nan"))

    def best_value(self, metric: str = "top1") -> float:
        """The best epoch's held-out ``metric`` of the primary prediction (NaN when there is none)."""
        if not self.best:
            return float("nan")
        return self.best["metrics"].get(self.primary, {}).get(metric, float("nan"))


def best_evaluation(history: Sequence[Dict[str, Any]], metric: str) -> Optional[Dict[str, Any]]:
    """Of a stage's held-out evaluations (its history's "eval" entries), the one whose primary prediction scores
    the highest ``metric`` (the earliest of equals): {"epoch", "step", "metric", "metrics"}; None without any."""
    best = None
    for entry in history:
        if entry.get("type") != "eval":
            continue
        value = entry["metrics"].get(entry["primary"], {}).get(metric, float("nan"))
        if best is None or value > best[0]:
            best = (value, entry)
    if best is None:
        return None
    entry = best[1]
    return {"epoch": entry["epoch"], "step": entry["step"], "metric": metric, "metrics": entry["metrics"]}


@dataclass
class _Stage:
    """Everything one stage's steps share."""
    cfg: Config
    mode: str
    recipe: StageSettings
    folder: Path
    info: D.DistInfo
    stop: StopFlag
    on_iteration: Hook
    config_text: str = ""
    # data
    train_loader: Any = None
    val_loader: Any = None
    transform: Any = None
    class_names: List[str] = field(default_factory=list)
    # model and optimisation
    model: Optional[nn.Module] = None
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Any = None
    scaler: Optional[torch.amp.GradScaler] = None
    amp_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    epochs: int = 0
    iters_per_epoch: int = 0
    meta: Dict[str, Any] = field(default_factory=dict)
    # where training continues from
    start_epoch: int = 0
    start_iter: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    log: Optional[StageLog] = None

    def say(self, text: str) -> None:
        if self.info.is_main:
            print(f"[{self.mode}] {text}", flush=True)


def run_stage(cfg: Config, mode: str, out_dir=None, init_from: Sequence = (), *, stop: Optional[StopFlag] = None,
              on_iteration: Hook = None) -> StageResult:
    """Train one stage of ``cfg`` in ``out_dir`` (default <train.out_dir>/<mode>) and evaluate it.

    The model starts from ``init_from`` (checkpoints holding parts of it) unless the stage resumes from its folder
    (``train.resume``; a complete stage, with final.pt, is not trained again). Trains ``train.<mode>_epochs``
    epochs with SGD and the per-iteration cosine schedule, checkpointing every ``train.checkpoint_every_iters``
    iterations and after every epoch, evaluating every ``train.eval_every_epochs`` epochs and after the last.
    SIGINT/SIGTERM (or ``stop``) save a checkpoint at the next iteration boundary and return a stopped result.
    ``on_iteration(record)`` is called after every iteration on every rank.
    """
    if mode not in MODES:
        raise ValueError(f"run_stage: mode must be one of {', '.join(MODES)}, got {mode!r}")
    info = D.init_distributed(cfg.train.device)
    folder = Path(out_dir) if out_dir is not None else Path(cfg.train.out_dir) / mode
    stage = _Stage(cfg, mode, cfg.stage(mode), folder, info, stop if stop is not None else StopFlag(), on_iteration,
                   to_toml(cfg))
    complete = _completed(stage)
    if complete is not None:
        return complete
    latest = _checkpoint_to_resume(stage)
    _seed_process(cfg, info, 0)
    _build_data(stage)
    _build_training(stage, init_from if latest is None else ())
    if latest is not None:
        _resume(stage, latest)
    _open_records(stage, resumed=latest is not None)
    try:
        evaluation = _train_epochs(stage)
    finally:
        stage.log.close()
    if isinstance(evaluation, StageResult):
        return evaluation
    return _finish(stage, evaluation)


# ---- set-up ------------------------------------------------------------------------------------------------------

def _completed(stage: _Stage) -> Optional[StageResult]:
    """The stage's result if its folder already holds its final weights and the run resumes."""
    final_path = stage.folder / "final.pt"
    if not (stage.cfg.train.resume and final_path.is_file()):
        return None
    final = load_checkpoint(final_path)
    stage.say(f"already complete: {final_path} (delete it to train the stage again)")
    history = final.get("history", [])
    return StageResult(stage.mode, stage.folder, final_path, final.get("metrics", {}), final.get("primary", ""),
                       epochs=max([e["epoch"] for e in history if e.get("type") == "eval"], default=0),
                       best=best_evaluation(history, stage.cfg.train.metric))


def _checkpoint_to_resume(stage: _Stage) -> Optional[Path]:
    """The checkpoint the stage continues from, or None to start; a folder holding a run that must not be
    continued is an error."""
    folder = stage.folder
    old = folder.parent / "fused"
    if folder.name == "epamnet" and old.is_dir() and not folder.exists():
        raise CheckpointError(f"{old} holds an EPAM-Net stage from an earlier epamx, which named the stage 'fused': "
                              f"rename it to {folder} to continue that run, or choose another train.out_dir")
    latest = latest_checkpoint(folder) if folder.is_dir() else None
    if latest is not None and not stage.cfg.train.resume:
        raise RunExistsError(f"{folder} already holds a run (latest: {latest}); set train.resume=true to continue "
                             f"it, or choose another train.out_dir")
    return latest


def _seed_process(cfg: Config, info: D.DistInfo, offset: int) -> None:
    """Deterministic algorithms when asked for, and every global RNG seeded with train.seed + ``offset``."""
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
        torch.backends.cudnn.deterministic = cfg.train.deterministic
    seed = cfg.train.seed + offset
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _build_data(stage: _Stage) -> None:
    """The training and held-out loaders and the device-side transform. Rank 0 builds the datasets first (the
    embedded dataset is generated on first use), the other ranks once it is there."""
    from epamx.data import build_dataset, build_loader

    cfg, info, streams, pipeline = stage.cfg, stage.info, modalities(stage.mode), stage.recipe.pipeline
    if not info.is_main:
        D.barrier()
    train_set = build_dataset(cfg.data, cfg.data.train_split, train=True, modalities=streams,
                              num_classes=cfg.model.num_classes or None, progress=info.is_main, pipeline=pipeline)
    val_set = build_dataset(cfg.data, cfg.data.val_split, train=False, modalities=streams,
                            num_classes=train_set.num_classes, progress=info.is_main, pipeline=pipeline)
    if info.is_main:
        D.barrier()
    if cfg.model.num_classes and cfg.model.num_classes != train_set.num_classes:
        raise DataError(f"model.num_classes = {cfg.model.num_classes}, but the dataset has {train_set.num_classes} "
                        f"classes; set model.num_classes = {train_set.num_classes} (or 0 to take the dataset's)")
    loader = dict(seed=cfg.train.seed, workers=cfg.train.workers, rank=info.rank, world_size=info.world_size,
                  pin_memory=info.device.type == "cuda")
    stage.train_loader = build_loader(train_set, stage.recipe.batch_size, train=True, **loader)
    stage.val_loader = build_loader(val_set, stage.recipe.batch_size, train=False, **loader)
    stage.transform = build_batch_transform(cfg, stage.mode, info.device)
    stage.class_names = list(train_set.class_names)


def _build_training(stage: _Stage, init_from: Sequence) -> None:
    """The model (initialised from ``init_from``, then wrapped for DDP), SGD, the schedule and the scaler."""
    cfg, info, mode, recipe = stage.cfg, stage.info, stage.mode, stage.recipe
    num_classes = len(stage.class_names)
    stage.channels_last = resolve_channels_last(cfg.model.channels_last, info.device)
    stage.amp_dtype = resolve_amp(recipe.amp, info.device)
    model = build_model(mode, num_classes, cfg.model.pose_channels, cfg.model.fused, cfg.model.dropout)
    model.memory_format = memory_format_name(stage.channels_last)
    model = model.to(info.device, memory_format=torch.channels_last_3d if stage.channels_last
                     else torch.contiguous_format)
    for source, parts in (init_model_from(model, list(init_from)) if init_from else {}).items():
        stage.say(f"initialised {', '.join(parts)} from {source}" if parts
                  else f"{source} holds no part of the {mode} model: not used")
    # Every rank built the same initial model from the same seed (DDP also broadcasts rank 0's); from here on each
    # rank draws its own dropout masks.
    _seed_process(cfg, info, info.rank)
    stage.model = D.wrap_model(model, info, cfg.model.sync_bn)
    batch, world = recipe.batch_size, info.world_size
    stage.optimizer = torch.optim.SGD(stage.model.parameters(), lr=recipe.lr_per_16 * batch * world / 16,
                                      momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                                      nesterov=recipe.nesterov)
    stage.train_loader.sampler.set_epoch(0, 0)
    stage.iters_per_epoch = len(stage.train_loader)
    if stage.iters_per_epoch == 0:
        raise DataError(f"[{mode}] the training split {cfg.data.train_split!r} yields no full batch of {batch} clips "
                        f"per process (stages.{mode}.batch_size or train.batch_size)")
    stage.epochs = recipe.epochs
    stage.scheduler = cosine_schedule(stage.optimizer, stage.epochs * stage.iters_per_epoch, recipe.warmup_iters,
                                      recipe.min_lr)
    stage.scaler = torch.amp.GradScaler(info.device.type, enabled=stage.amp_dtype == torch.float16)
    stage.meta = {"mode": mode, "num_classes": num_classes, "pose_channels": cfg.model.pose_channels,
                  "class_names": stage.class_names, "world_size": world, "batch_size": batch,
                  "iters_per_epoch": stage.iters_per_epoch, "epamx": epamx.__version__, "torch": str(torch.__version__)}


def _resume(stage: _Stage, latest: Path) -> None:
    """Model, optimiser, schedule, scaler, this rank's RNG states and the position in the data from ``latest``."""
    checkpoint = load_checkpoint(latest, map_location="cpu")
    check_compatible(checkpoint, latest, **{k: stage.meta[k] for k in ("mode", "num_classes", "pose_channels",
                                                                       "world_size", "batch_size", "iters_per_epoch")})
    D.unwrap(stage.model).load_state_dict(checkpoint["model"])
    stage.optimizer.load_state_dict(checkpoint["optimizer"])
    stage.scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint.get("scaler"):
        stage.scaler.load_state_dict(checkpoint["scaler"])
    restore_rng_state(checkpoint["rng"][stage.info.rank])
    stage.start_epoch, stage.start_iter = checkpoint["epoch"], checkpoint["iter"]
    stage.history = list(checkpoint["history"])
    if checkpoint.get("config") != stage.config_text:
        stage.say(f"note: the config differs from the one {latest} was trained with")
    stage.say(f"resuming from {latest}: epoch {stage.start_epoch + 1}, iteration {stage.start_iter}, "
              f"step {stage.scheduler.last_epoch}")


def _open_records(stage: _Stage, resumed: bool) -> None:
    """config.toml, environment.json and the stage's log (rank 0 writes)."""
    if stage.info.is_main:
        (stage.folder / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write_text(stage.folder / "config.toml", stage.config_text)
        write_json(stage.folder / "environment.json", environment_info(stage.info.world_size))
    stage.log = StageLog(stage.folder, stage.scheduler.last_epoch if resumed else None, stage.info.is_main,
                         stage.cfg.train.tensorboard)


# ---- training ----------------------------------------------------------------------------------------------------

def _save(stage: _Stage, epoch: int, iteration: int, name: str) -> Optional[Path]:
    """A training checkpoint (every rank's RNG states gathered; rank 0 writes), ``latest`` pointed at it."""
    rng = D.all_gather_objects(capture_rng_state())
    if not stage.info.is_main:
        return None
    state = {"meta": stage.meta, "model": D.unwrap(stage.model).state_dict(), "optimizer": stage.optimizer.state_dict(),
             "scheduler": stage.scheduler.state_dict(), "scaler": stage.scaler.state_dict(), "rng": rng,
             "epoch": epoch, "iter": iteration, "step": stage.scheduler.last_epoch, "config": stage.config_text,
             "history": stage.history}
    checkpoints = stage.folder / "checkpoints"
    path = save_checkpoint(state, checkpoints / name, folder=stage.folder)
    prune_checkpoints(checkpoints, "step_*.pt", stage.cfg.train.keep_checkpoints, protect=path)
    return path


def _iteration_done(stage: _Stage, record: Dict[str, Any]) -> None:
    stage.log.write(record)
    every = stage.cfg.train.checkpoint_every_iters
    if every and record["step"] % every == 0 and record["iter"] < stage.iters_per_epoch:
        _save(stage, record["epoch"], record["iter"], f"step_{record['step']:08d}.pt")
    if stage.on_iteration is not None:
        stage.on_iteration(record)


def _evaluate(stage: _Stage) -> Evaluation:
    return evaluate(stage.model, stage.val_loader, stage.transform, mode=stage.mode, device=stage.info.device,
                    channels_last=stage.channels_last, amp_dtype=stage.amp_dtype, progress=stage.cfg.train.progress,
                    class_names=stage.class_names)


def _train_epochs(stage: _Stage):
    """The remaining epochs; the last evaluation, or a stopped StageResult."""
    cfg, evaluation = stage.cfg, None
    with stop_on_signals(stage.stop):
        for epoch in range(stage.start_epoch, stage.epochs):
            result = train_one_epoch(
                stage.model, stage.train_loader, stage.transform, stage.optimizer, stage.scheduler, mode=stage.mode,
                device=stage.info.device, epoch=epoch, start_iter=stage.start_iter if epoch == stage.start_epoch else 0,
                scaler=stage.scaler, amp_dtype=stage.amp_dtype, clip_grad=stage.recipe.clip_grad,
                channels_last=stage.channels_last, stop=stage.stop, on_iteration=lambda r: _iteration_done(stage, r),
                progress=cfg.train.progress, desc=f"[{stage.mode}] epoch {epoch + 1}/{stage.epochs}")
            if result.stopped:
                path = _save(stage, epoch, result.iterations, f"step_{stage.scheduler.last_epoch:08d}.pt")
                stage.say(f"stopped ({stage.stop.reason}) at epoch {epoch + 1}, iteration {result.iterations}/"
                          f"{stage.iters_per_epoch}; checkpoint {path}. Run the same command again to resume "
                          f"(train.resume = true).")
                return StageResult(stage.mode, stage.folder, None, stopped=True, resume_from=path)
            every = cfg.train.eval_every_epochs
            if epoch + 1 == stage.epochs or (every and (epoch + 1) % every == 0):
                evaluation = _evaluate(stage)
                entry = {"type": "eval", "epoch": epoch + 1, "step": stage.scheduler.last_epoch, **evaluation.summary()}
                stage.history.append(entry)
                stage.log.write(entry)
                parts = ", ".join(f"{s} {100 * m['top1']:.2f}" for s, m in evaluation.metrics.items())
                loss = f"loss {result.mean_loss:.4f}, " if math.isfinite(result.mean_loss) else ""
                stage.say(f"epoch {epoch + 1}/{stage.epochs}: {loss}held-out top-1 {parts}")
            _save(stage, epoch + 1, 0, f"epoch_{epoch + 1:03d}.pt")
    # resumed after the last epoch's checkpoint: evaluate the final weights once more
    return evaluation if evaluation is not None else _evaluate(stage)


def _finish(stage: _Stage, evaluation: Evaluation) -> StageResult:
    """final.pt, the evaluation's report and the training curves (rank 0), then every rank returns together."""
    final_path = stage.folder / "final.pt"
    best = best_evaluation(stage.history, stage.cfg.train.metric)
    if stage.info.is_main:
        from epamx.plots import plot_training_curves

        final = {"meta": stage.meta, "model": D.unwrap(stage.model).state_dict(), "config": stage.config_text,
                 "metrics": evaluation.metrics, "primary": evaluation.primary, "history": stage.history}
        save_checkpoint(final, final_path)
        write_evaluation_report(stage.folder, evaluation, f"{stage.mode} stage: {evaluation.primary} predictions",
                                {"epoch": stage.epochs, "best_epoch": best})
        plot_training_curves(stage.folder / "log.jsonl", stage.folder / "curves.png", title=f"{stage.mode} stage")
    D.barrier()
    return StageResult(stage.mode, stage.folder, final_path, evaluation.metrics, evaluation.primary,
                       epochs=stage.epochs, best=best)
