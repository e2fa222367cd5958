"""Training and evaluation: plain functions over a DataLoader, not a framework.

    train_one_epoch(model, loader, transform, optimizer, scheduler, mode=..., device=..., epoch=...)
    evaluate(model, loader, transform, device=...) -> Evaluation
    run_stage(cfg, mode, out_dir, init_from) -> StageResult       one stage: data, model, resume, train, evaluate
    run(cfg) -> RunResult                                          mode "all": pose, rgb, then fused from both

Resuming is exact: the data position is the sampler's ``set_epoch(epoch, skip)``, each clip's augmentation comes
from its own seed (epamx.data.sampler), and every RNG, the optimiser, the schedule and the gradient scaler are
restored from the checkpoint. The DataLoader's own draw from torch's RNG (its workers' base seed) is taken outside
the model's RNG stream, so where an epoch's iterator is created does not change the dropout masks that follow. On
a CPU with ``train.deterministic`` a resumed run ends with the same weights, bit for bit, as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from epamx.models.optimize import optimize_for_inference
from epamx.models.streams import build_model, init_from as init_model_from, modalities, model_mode, stream_logits
from epamx.train import distributed as D
from epamx.train.checkpoint import (CheckpointError, atomic_write_bytes, capture_rng_state, check_compatible,
                                    latest_checkpoint, load_checkpoint, prune_checkpoints, restore_rng_state,
                                    save_checkpoint)
from epamx.train.config import Config, to_toml
from epamx.train.metrics import confusion_matrix, per_class_table, stream_metrics

__all__ = ["EpochResult", "Evaluation", "RunResult", "StageResult", "StopFlag", "cosine_schedule",
           "environment_info", "evaluate", "evaluate_checkpoint", "load_model", "resolve_amp", "run", "run_stage",
           "stop_on_signals", "train_one_epoch"]

STAGES = ("pose", "rgb", "fused")  # the authors' protocol: each stream alone, then EPAM-Net from both


# ---- stopping on a signal ----------------------------------------------------------------------------------------

@dataclass
class StopFlag:
    """Set by a signal handler (or anything else); the loop saves a checkpoint at the next iteration boundary."""
    requested: bool = False
    reason: str = ""

    def request(self, reason: str = "requested") -> None:
        self.reason = self.reason or reason
        self.requested = True


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)):
    """While inside, SIGINT/SIGTERM set ``flag`` instead of killing the process; a second one stops at once
    (KeyboardInterrupt). Handlers can only be installed from the main thread; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if flag.requested:
            raise KeyboardInterrupt(f"{name} again: stopping without a checkpoint")
        flag.request(name)
        if D.is_main():
            print(f"\n{name}: saving a checkpoint after this iteration, then stopping "
                  f"(send it again to quit at once)", file=sys.stderr, flush=True)

    for s in signals:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---- pieces ------------------------------------------------------------------------------------------------------

def cosine_schedule(optimizer: torch.optim.Optimizer, total_iters: int, warmup_iters: int = 0,
                    min_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule (call ``step()`` after every optimiser step): linear warm-up from 0 over
    ``warmup_iters``, then cosine from each group's lr down to ``min_lr`` at ``total_iters``
    (mmcv's CosineAnnealing by iteration)."""
    total_iters = max(1, int(total_iters))
    base = optimizer.param_groups[0]["lr"]
    floor = min_lr / base if base > 0 else 0.0

    def factor(step: int) -> float:
        cosine = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step, total_iters) / total_iters))
        if warmup_iters > 0 and step < warmup_iters:
            return cosine * step / warmup_iters
        return cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``train.amp`` on ``device``, or None for full precision."""
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def _resolve_channels_last(value, device: torch.device) -> bool:
    return device.type == "cpu" if value == "auto" else bool(value)


def _memory_format_name(channels_last: bool) -> str:
    return "channels_last_3d" if channels_last else "contiguous"


def _in_memory_format(model: nn.Module, channels_last: bool) -> nn.Module:
    """The model with its weights, and the policy its forward applies to inputs, in the configured format."""
    model.memory_format = _memory_format_name(channels_last)
    return model.to(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)


def inference_model(model: nn.Module, channels_last, device: torch.device) -> nn.Module:
    """optimize_for_inference(model) in the memory format ``model.channels_last`` (True, False or "auto") asks
    for on ``device``: what eval and predict run."""
    return optimize_for_inference(model, _memory_format_name(_resolve_channels_last(channels_last, device)))


@contextlib.contextmanager
def _rng_untouched():
    """Whatever runs inside (creating a DataLoader iterator draws its workers' base seed from torch's RNG) leaves
    torch's CPU RNG where it was."""
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _configure_determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic


# ---- one epoch ---------------------------------------------------------------------------------------------------

@dataclass
class EpochResult:
    iterations: int        # iterations of the epoch done so far (start_iter included)
    stopped: bool          # a stop was requested; the epoch is unfinished unless iterations == its length
    mean_loss: float       # over this call's iterations


def _reduce(values: List[float], flag: bool) -> tuple:
    """Mean of ``values`` over ranks, and whether ``flag`` is set on any rank: one small collective."""
    if D.get_world_size() == 1:
        return values, flag
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")
    packed = torch.tensor(values + [1.0 if flag else 0.0], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(packed)
    packed = packed.cpu().tolist()
    return [v / D.get_world_size() for v in packed[:-1]], packed[-1] > 0


def train_one_epoch(model: nn.Module, loader, transform, optimizer: torch.optim.Optimizer, scheduler, *, mode: str,
                    device: torch.device, epoch: int, start_iter: int = 0,
                    scaler: Optional[torch.amp.GradScaler] = None, amp_dtype: Optional[torch.dtype] = None,
                    clip_grad: float = 40.0, channels_last: bool = False, stop: Optional[StopFlag] = None,
                    on_iteration: Optional[Callable[[Dict[str, Any]], None]] = None, progress: bool = False,
                    desc: str = "") -> EpochResult:
    """Train ``model`` (RGBStream, PoseStream or EPAMNet, maybe DDP-wrapped) over one epoch of ``loader``.

    Calls ``loader.sampler.set_epoch(epoch, skip=start_iter * loader.batch_size)`` first, so a resumed epoch
    continues with the batch it would have seen. Per iteration: ``transform(batch, device, channels_last)`` ->
    (imgs, heatmaps, labels); loss = the sum of each stream's cross-entropy; gradients clipped to L2 norm
    ``clip_grad`` (0: off); one optimiser and one ``scheduler`` step. Then ``on_iteration(record)`` on every
    rank (record: epoch, iter (iterations done in this epoch), step (global), loss, loss_<stream>, lr,
    grad_norm, clips_per_s (all ranks), data_s), and the epoch ends early, at this iteration boundary, when
    ``stop.requested`` on any rank.
    """
    if model_mode(model) != mode:
        raise ValueError(f"train_one_epoch: mode {mode!r}, but the model is a {model_mode(model)} model")
    model.train()
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch, skip=start_iter * loader.batch_size)
    world = D.get_world_size()
    params = [p for p in model.parameters() if p.requires_grad]
    scaling = scaler is not None and scaler.is_enabled()
    bar = None
    if progress and D.is_main():
        from tqdm import tqdm

        bar = tqdm(total=start_iter + len(loader), initial=start_iter, desc=desc, dynamic_ncols=True, leave=False)
    iteration, losses_seen, stopped = start_iter, [], False
    with _rng_untouched():
        batches = iter(loader)
    tick = time.perf_counter()
    try:
        for batch in batches:
            data_s = time.perf_counter() - tick
            if batch is None:  # every clip of the batch was unreadable (data.skip_bad): consumed, no update
                if world > 1:
                    raise RuntimeError("a whole batch of clips was unreadable (data.skip_bad) on one rank; under DDP "
                                       "every rank must take each step: fix or remove the unreadable clips")
                iteration += 1
                tick = time.perf_counter()
                continue
            imgs, heatmaps, labels = transform(batch, device, channels_last)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = stream_logits(model, imgs, heatmaps)
            losses = {name: F.cross_entropy(value.float(), labels) for name, value in logits.items()}
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            if scaling:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            # max_norm = inf measures the norm without changing the gradients (they are scaled by exactly 1)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad > 0 else math.inf)
            lr = optimizer.param_groups[0]["lr"]
            if scaling:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            iteration += 1
            names = list(losses)
            values, stop_now = _reduce([loss.item()] + [losses[n].item() for n in names] + [grad_norm.item()],
                                       bool(stop is not None and stop.requested))
            if not math.isfinite(values[0]):
                raise FloatingPointError(f"the training loss is {values[0]} at epoch {epoch + 1}, iteration "
                                         f"{iteration} (step {scheduler.last_epoch}): training diverged; lower "
                                         f"optim.lr_per_16 or resume from an earlier checkpoint")
            now = time.perf_counter()
            record = {"type": "train", "epoch": epoch, "iter": iteration, "step": scheduler.last_epoch,
                      "loss": values[0], **{f"loss_{n}": v for n, v in zip(names, values[1:-1])}, "lr": lr,
                      "grad_norm": values[-1], "clips_per_s": labels.shape[0] * world / max(now - tick, 1e-9),
                      "data_s": data_s}
            if batch.get("skipped"):
                record["skipped"] = int(batch["skipped"])
            losses_seen.append(values[0])
            if bar is not None:
                bar.set_postfix(loss=f"{values[0]:.3f}", lr=f"{lr:.2e}", clips_s=f"{record['clips_per_s']:.1f}",
                                refresh=False)
                bar.update(1)
            if on_iteration is not None:
                on_iteration(record)
            if world == 1 and stop is not None and stop.requested:
                # on_iteration may have asked to stop; under DDP such a request is agreed on at the next iteration
                stop_now = True
            if stop_now:
                if stop is not None:
                    stop.request("requested on another rank")
                stopped = True
                break
            tick = time.perf_counter()
    finally:
        if bar is not None:
            bar.close()
        del batches
    return EpochResult(iteration, stopped, float(np.mean(losses_seen)) if losses_seen else float("nan"))


# ---- evaluation --------------------------------------------------------------------------------------------------

@dataclass
class Evaluation:
    """Every held-out clip's logits, de-duplicated across ranks and sorted by dataset index, and their metrics.

    ``logits``: {'rgb': (N, C), 'pose': (N, C)} (the model's streams) plus 'fused' (their sum) for EPAM-Net;
    ``metrics``: {stream: {'top1', 'top5', 'mean_class_accuracy'}}; ``primary``: 'fused', or the one stream.
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


@torch.no_grad()
def evaluate(model: nn.Module, loader, transform, *, mode: Optional[str] = None, device: torch.device,
             channels_last: bool = False, amp_dtype: Optional[torch.dtype] = None, progress: bool = False,
             class_names: Optional[Sequence[str]] = None) -> Evaluation:
    """Logits of every clip of ``loader`` (one clip per video), gathered from all ranks with all_gather,
    de-duplicated by the batches' 'index', and top-1 / top-5 / mean class accuracy for each stream and for the
    fused prediction (rgb + pose logits). Every rank returns the same Evaluation.

    Runs the model outside DDP (ranks may hold different numbers of clips); under DDP, rank 0's batch-norm
    buffers are broadcast first, so every rank evaluates the weights that rank 0 saves.
    """
    D.broadcast_buffers(model)
    inner = D.unwrap(model)
    if mode is not None and model_mode(inner) != mode:
        raise ValueError(f"evaluate: mode {mode!r}, but the model is a {model_mode(inner)} model")
    was_training = inner.training
    inner.eval()
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(0)
    indices, labels, logits = [], [], {}
    bar = None
    if progress and D.is_main():
        from tqdm import tqdm

        bar = tqdm(total=len(loader), desc="evaluate", dynamic_ncols=True, leave=False)
    try:
        with _rng_untouched():
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
    if len(streams) == 2:
        all_logits["fused"] = all_logits["rgb"] + all_logits["pose"]
    metrics = stream_metrics(all_logits, all_labels)
    primary = "fused" if "fused" in all_logits else streams[0]
    return Evaluation(all_indices[unique], all_labels, all_logits, metrics, primary,
                      list(class_names) if class_names is not None else None)


# ---- a run's records ---------------------------------------------------------------------------------------------

def _epamx_version() -> str:
    import epamx

    return str(getattr(epamx, "__version__", "?"))


def environment_info() -> Dict[str, Any]:
    """Versions and the git commit (when epamx runs from a checkout) a run records in environment.json."""
    import epamx

    info = {"epamx": _epamx_version(), "torch": str(torch.__version__), "python": platform.python_version(),
            "platform": platform.platform(), "cuda": torch.version.cuda,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "world_size": D.get_world_size(), "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    package = Path(epamx.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=package,
                                   capture_output=True, text=True, timeout=10)
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


class _JsonLog:
    """The stage's JSON-lines log, written by rank 0 only. On resume, records after the checkpoint's step (from
    the iterations a killed run did after its last checkpoint) are dropped, so the log reads as one run."""

    def __init__(self, path: Path, keep_until_step: Optional[int]):
        self.path = path
        self.file = None
        if not D.is_main():
            return
        kept = []
        if keep_until_step is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= keep_until_step:
                    kept.append(line + "\n")
        atomic_write_bytes(path, "".join(kept).encode())
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _say(*args) -> None:
    if D.is_main():
        print(*args, flush=True)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


@dataclass
class StageResult:
    mode: str
    out_dir: Path
    final_checkpoint: Optional[Path]     # out_dir/final.pt once the stage is complete
    metrics: Dict[str, Dict[str, float]] = field(default_factory=dict)  # the last evaluation's
    primary: str = ""
    stopped: bool = False
    resume_from: Optional[Path] = None   # the checkpoint a stopped stage continues from

    def headline(self, metric: str = "top1") -> float:
        return self.metrics.get(self.primary, {}).get(metric, float("nan"))


# ---- one stage ---------------------------------------------------------------------------------------------------

def _data_api():
    """The data pipeline's entry points, looked up when a stage starts (epamx.data)."""
    import epamx.data as data

    missing = [n for n in ("build_dataset", "build_loader", "BatchTransform") if not hasattr(data, n)]
    if missing:
        raise RuntimeError(f"epamx.data lacks {', '.join(missing)}: this build has no data pipeline to train from")
    return data


def _build_datasets(data, cfg: Config, streams):
    """The training and evaluation splits. Rank 0 builds first (the embedded dataset is generated on first use),
    the other ranks once it is there; the evaluation split takes the training split's class count."""
    if not D.is_main():
        D.barrier()
    train_set = data.build_dataset(cfg.data, cfg.data.train_split, train=True, modalities=streams,
                                   num_classes=cfg.model.num_classes or None, progress=D.is_main())
    val_set = data.build_dataset(cfg.data, cfg.data.val_split, train=False, modalities=streams,
                                 num_classes=int(train_set.num_classes), progress=D.is_main())
    if D.is_main():
        D.barrier()
    return train_set, val_set


def _batch_transform(data, cfg: Config, streams, device: torch.device):
    transform = data.BatchTransform(cfg.data, streams)
    joints = getattr(transform, "num_joints", None)
    if "pose" in streams and joints is not None and joints != cfg.model.pose_channels:
        raise ValueError(f"model.pose_channels = {cfg.model.pose_channels}, but data.skeleton {cfg.data.skeleton!r} "
                         f"renders {joints} heatmap channels")
    return transform.to(device) if isinstance(transform, nn.Module) else transform


def _num_classes(cfg: Config, train_set, val_set) -> int:
    found = int(train_set.num_classes)
    if int(val_set.num_classes) != found:
        raise ValueError(f"the training split {cfg.data.train_split!r} has {found} classes but the evaluation split "
                         f"{cfg.data.val_split!r} has {val_set.num_classes}")
    if cfg.model.num_classes and cfg.model.num_classes != found:
        raise ValueError(f"model.num_classes = {cfg.model.num_classes}, but the dataset has {found} classes; set "
                         f"model.num_classes = {found} (or 0 to take the dataset's)")
    return found


def run_stage(cfg: Config, mode: str, out_dir=None, init_from: Sequence = (), *, stop: Optional[StopFlag] = None,
              on_iteration: Optional[Callable[[Dict[str, Any]], None]] = None) -> StageResult:
    """Train one stage ("rgb", "pose" or "fused") of ``cfg`` in ``out_dir`` (default <train.out_dir>/<mode>).

    Builds the data (epamx.data: build_dataset, build_loader, BatchTransform), the model (initialised from
    ``init_from`` unless resuming), SGD and the per-iteration cosine schedule; continues from ``out_dir/latest``
    when ``train.resume`` (an already complete stage, with final.pt, is not trained again); trains
    ``train.epochs`` epochs, checkpointing every ``train.checkpoint_every_iters`` iterations and after every epoch,
    and evaluating every ``train.eval_every_epochs`` epochs and after the last. SIGINT/SIGTERM (or ``stop``) save
    a checkpoint at the next iteration boundary and return a stopped StageResult. Writes (rank 0): log.jsonl,
    config.toml, environment.json, checkpoints/, latest, final.pt, metrics.json, per_class.txt, curves.png,
    confusion.png.
    """
    modalities(mode)  # validates mode
    info = D.init_distributed(cfg.train.device)
    device, rank, world = info.device, info.rank, info.world_size
    stage_dir = Path(out_dir) if out_dir is not None else Path(cfg.train.out_dir) / mode
    final_path = stage_dir / "final.pt"
    if cfg.train.resume and final_path.is_file():
        final = load_checkpoint(final_path)
        _say(f"[{mode}] already complete: {final_path} (delete it to train the stage again)")
        return StageResult(mode, stage_dir, final_path, final.get("metrics", {}), final.get("primary", ""))
    latest = latest_checkpoint(stage_dir) if stage_dir.is_dir() else None
    if latest is not None and not cfg.train.resume:
        raise FileExistsError(f"{stage_dir} already holds a run (latest: {latest}); set train.resume=true to "
                              f"continue it, or choose another train.out_dir")
    _configure_determinism(cfg.train.deterministic, device)
    _seed_everything(cfg.train.seed)

    data = _data_api()
    streams = modalities(mode)
    train_set, val_set = _build_datasets(data, cfg, streams)
    num_classes = _num_classes(cfg, train_set, val_set)
    class_names = [str(n) for n in getattr(train_set, "class_names", range(num_classes))]
    batch = cfg.train.batch_size
    pin = device.type == "cuda"
    train_loader = data.build_loader(train_set, batch, train=True, seed=cfg.train.seed, workers=cfg.train.workers,
                                     rank=rank, world_size=world, pin_memory=pin)
    val_loader = data.build_loader(val_set, batch, train=False, seed=cfg.train.seed, workers=cfg.train.workers,
                                   rank=rank, world_size=world, pin_memory=pin)
    transform = _batch_transform(data, cfg, streams, device)
    channels_last = _resolve_channels_last(cfg.model.channels_last, device)
    amp_dtype = resolve_amp(cfg.train.amp, device)

    model = _in_memory_format(build_model(mode, num_classes, cfg.model.pose_channels, cfg.model.fused,
                                          cfg.model.dropout).to(device), channels_last)
    if init_from and latest is None:
        for source, parts in init_model_from(model, list(init_from)).items():
            _say(f"[{mode}] initialised {', '.join(parts)} from {source}" if parts
                 else f"[{mode}] {source} holds no part of the {mode} model: not used")
    # Every rank built the same initial model from the same seed (DDP also broadcasts rank 0's); from here on
    # each rank draws its own dropout masks.
    _seed_everything(cfg.train.seed + rank)
    model = D.wrap_model(model, info, cfg.model.sync_bn)

    lr = cfg.optim.stage_lr_per_16(mode) * batch * world / 16
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
    train_loader.sampler.set_epoch(0, 0)
    iters_per_epoch = len(train_loader)
    if iters_per_epoch == 0:
        raise ValueError(f"[{mode}] the training split yields no full batch of {batch} clips per process")
    epochs = cfg.train.stage_epochs(mode)
    total_iters = epochs * iters_per_epoch
    scheduler = cosine_schedule(optimizer, total_iters, cfg.optim.warmup_iters, cfg.optim.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    meta = {"mode": mode, "num_classes": num_classes, "pose_channels": cfg.model.pose_channels,
            "class_names": class_names, "world_size": world, "batch_size": batch, "iters_per_epoch": iters_per_epoch,
            "epamx": _epamx_version(), "torch": str(torch.__version__)}
    config_text = to_toml(cfg)
    start_epoch, start_iter, history = 0, 0, []
    if latest is not None:
        checkpoint = load_checkpoint(latest, map_location="cpu")
        check_compatible(checkpoint, latest, mode=mode, num_classes=num_classes,
                         pose_channels=cfg.model.pose_channels, world_size=world, batch_size=batch,
                         iters_per_epoch=iters_per_epoch)
        D.unwrap(model).load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_state(checkpoint["rng"][rank])
        start_epoch, start_iter, history = checkpoint["epoch"], checkpoint["iter"], list(checkpoint["history"])
        if checkpoint.get("config") != config_text:
            _say(f"[{mode}] note: the config differs from the one {latest} was trained with")
        _say(f"[{mode}] resuming from {latest}: epoch {start_epoch + 1}, iteration {start_iter}, "
             f"step {scheduler.last_epoch}")

    checkpoints = stage_dir / "checkpoints"
    log = None
    if D.is_main():
        checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(stage_dir / "config.toml", config_text.encode())
        _write_json(stage_dir / "environment.json", environment_info())
    log = _JsonLog(stage_dir / "log.jsonl", scheduler.last_epoch if latest is not None else None)

    def save(epoch: int, iteration: int, name: str) -> Optional[Path]:
        rng = D.all_gather_objects(capture_rng_state())
        if not D.is_main():
            return None
        state = {"meta": meta, "model": D.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng, "epoch": epoch,
                 "iter": iteration, "step": scheduler.last_epoch, "config": config_text, "history": history}
        path = save_checkpoint(state, checkpoints / name, folder=stage_dir)
        prune_checkpoints(checkpoints, "step_*.pt", cfg.train.keep_checkpoints, protect=path)
        return path

    def iteration_done(record: Dict[str, Any]) -> None:
        log.write(record)
        every = cfg.train.checkpoint_every_iters
        if every and record["step"] % every == 0 and record["iter"] < iters_per_epoch:
            save(record["epoch"], record["iter"], f"step_{record['step']:08d}.pt")
        if on_iteration is not None:
            on_iteration(record)

    stop = stop if stop is not None else StopFlag()
    evaluation: Optional[Evaluation] = None
    try:
        with stop_on_signals(stop):
            for epoch in range(start_epoch, epochs):
                result = train_one_epoch(
                    model, train_loader, transform, optimizer, scheduler, mode=mode, device=device, epoch=epoch,
                    start_iter=start_iter if epoch == start_epoch else 0, scaler=scaler, amp_dtype=amp_dtype,
                    clip_grad=cfg.optim.clip_grad, channels_last=channels_last, stop=stop,
                    on_iteration=iteration_done, progress=cfg.train.progress,
                    desc=f"[{mode}] epoch {epoch + 1}/{epochs}")
                if result.stopped:
                    path = save(epoch, result.iterations, f"step_{scheduler.last_epoch:08d}.pt")
                    _say(f"[{mode}] stopped ({stop.reason}) at epoch {epoch + 1}, iteration {result.iterations}/"
                         f"{iters_per_epoch}; checkpoint {path}. Run the same command again to resume "
                         f"(train.resume = true).")
                    return StageResult(mode, stage_dir, None, stopped=True, resume_from=path)
                last = epoch + 1 == epochs
                every = cfg.train.eval_every_epochs
                if last or (every and (epoch + 1) % every == 0):
                    evaluation = evaluate(model, val_loader, transform, mode=mode, device=device,
                                          channels_last=channels_last, amp_dtype=amp_dtype,
                                          progress=cfg.train.progress, class_names=class_names)
                    entry = {"type": "eval", "epoch": epoch + 1, "step": scheduler.last_epoch,
                             **evaluation.summary()}
                    history.append(entry)
                    log.write(entry)
                    parts = ", ".join(f"{s} {100 * m['top1']:.2f}" for s, m in evaluation.metrics.items())
                    loss = f"loss {result.mean_loss:.4f}, " if math.isfinite(result.mean_loss) else ""
                    _say(f"[{mode}] epoch {epoch + 1}/{epochs}: {loss}held-out top-1 {parts}")
                save(epoch + 1, 0, f"epoch_{epoch + 1:03d}.pt")
    finally:
        log.close()

    if evaluation is None:  # resumed after the last epoch's checkpoint: evaluate the final weights once more
        evaluation = evaluate(model, val_loader, transform, mode=mode, device=device, channels_last=channels_last,
                              amp_dtype=amp_dtype, progress=cfg.train.progress, class_names=class_names)
    if D.is_main():
        final = {"meta": meta, "model": D.unwrap(model).state_dict(), "config": config_text,
                 "metrics": evaluation.metrics, "primary": evaluation.primary, "history": history}
        save_checkpoint(final, final_path)
        _write_json(stage_dir / "metrics.json", {**evaluation.summary(), "class_names": class_names})
        (stage_dir / "per_class.txt").write_text(evaluation.per_class_table())
        from epamx.plots import plot_confusion_matrix, plot_training_curves

        plot_training_curves(stage_dir / "log.jsonl", stage_dir / "curves.png", title=f"{mode} stage")
        plot_confusion_matrix(evaluation.confusion(), stage_dir / "confusion.png", class_names,
                              title=f"{mode} stage: {evaluation.primary} predictions")
    D.barrier()
    return StageResult(mode, stage_dir, final_path, evaluation.metrics, evaluation.primary)


# ---- the protocol ------------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    out_dir: Path
    stages: Dict[str, StageResult]
    stopped: bool = False


def run(cfg: Config, *, stop: Optional[StopFlag] = None) -> RunResult:
    """Train ``cfg``: one stage for mode "rgb", "pose" or "fused"; for "all", the authors' protocol: the pose
    stream alone, the RGB stream alone, then EPAM-Net initialised from both stage checkpoints and fine-tuned.
    Each stage prints its held-out top-1; a stopped stage ends the run (run it again to resume)."""
    info = D.init_distributed(cfg.train.device)
    out_dir = Path(cfg.train.out_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / "config.toml", to_toml(cfg).encode())
        _write_json(out_dir / "environment.json", environment_info())
    stages = STAGES if cfg.train.mode == "all" else (cfg.train.mode,)
    results: Dict[str, StageResult] = {}
    stop = stop if stop is not None else StopFlag()
    for mode in stages:
        if cfg.train.mode == "all" and mode == "fused":
            init = [results["pose"].final_checkpoint, results["rgb"].final_checkpoint]
        else:
            init = list(cfg.train.init_from)
        result = run_stage(cfg, mode, out_dir / mode, init, stop=stop)
        results[mode] = result
        if result.stopped:
            return RunResult(out_dir, results, stopped=True)
        _say(f"[{mode}] held-out {cfg.train.metric} ({result.primary}): "
             f"{100 * result.headline(cfg.train.metric):.2f}%")
    summary = {"out_dir": str(out_dir), "metric": cfg.train.metric,
               "stages": {m: {"final_checkpoint": str(r.final_checkpoint), "primary": r.primary,
                              "metrics": r.metrics} for m, r in results.items()}}
    if info.is_main:
        _write_json(out_dir / "summary.json", summary)
        lines = [f"Done. Everything is in {out_dir}/:"]
        for m, r in results.items():
            lines.append(f"  {m:<6} {cfg.train.metric} {100 * r.headline(cfg.train.metric):6.2f}%  "
                         f"{r.out_dir}/ (final.pt, log.jsonl, curves.png, confusion.png, per_class.txt)")
        lines.append("  summary.json, config.toml, environment.json")
        _say("\n".join(lines))
    D.barrier()  # every rank leaves together (gloo can abort a rank whose peer has already torn down)
    return RunResult(out_dir, results)


# ---- trained models ----------------------------------------------------------------------------------------------

def load_model(path, device="cpu", fused: bool = True, dropout: float = 0.5):
    """The model a checkpoint (final.pt or any training checkpoint) holds, in eval mode, and its ``meta``
    (mode, num_classes, pose_channels, class_names)."""
    checkpoint = load_checkpoint(path)
    meta = checkpoint.get("meta")
    if not isinstance(meta, dict) or "mode" not in meta:
        raise CheckpointError(f"{path}: has no model description ('meta')")
    model = build_model(meta["mode"], meta["num_classes"], meta["pose_channels"], fused, dropout)
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), meta


def evaluate_checkpoint(cfg: Config, path, split: Optional[str] = None, *, progress: bool = True) -> Evaluation:
    """Evaluate a checkpoint on ``split`` (default ``cfg.data.val_split``) of cfg's dataset, one clip per video;
    under torchrun every rank evaluates its share."""
    info = D.init_distributed(cfg.train.device)
    model, meta = load_model(path, info.device, cfg.model.fused)
    mode = meta["mode"]
    data = _data_api()
    dataset = data.build_dataset(cfg.data, split or cfg.data.val_split, train=False, modalities=modalities(mode),
                                 num_classes=meta["num_classes"], progress=progress and info.is_main)
    if int(dataset.num_classes) != meta["num_classes"]:
        raise CheckpointError(f"{path}: checkpoint has {meta['num_classes']} classes, the dataset "
                              f"{dataset.num_classes}")
    loader = data.build_loader(dataset, cfg.train.batch_size, train=False, seed=cfg.train.seed,
                               workers=cfg.train.workers, rank=info.rank, world_size=info.world_size,
                               pin_memory=info.device.type == "cuda")
    transform = _batch_transform(data, cfg, modalities(mode), info.device)
    channels_last = _resolve_channels_last(cfg.model.channels_last, info.device)
    model = inference_model(model, channels_last, info.device)
    return evaluate(model, loader, transform, mode=mode, device=info.device, channels_last=channels_last,
                    amp_dtype=resolve_amp(cfg.train.amp, info.device), progress=progress,
                    class_names=meta.get("class_names"))
