"""A plan before a long run (``epamx train --config X --plan``): a few measured iterations of each stage of a
config on the chosen device, at the config's sizes, and per stage what they say:

- training and evaluation speed (clips/s) and the peak memory (CUDA: the allocator's peak; CPU: this process's
  peak resident memory, the loader's workers not included);
- the data loader against the model: one clip's loading time (decoding, sampling, cropping: what a worker does),
  the workers needed to keep up with the measured compute, and the time the measured iterations waited for data;
- a batch that does not fit: the largest that does, as advice (CUDA: tried; CPU: from the memory of batches 1
  and 2, against the memory available), and the stage measured at that batch instead;
- the whole schedule's time on this machine: training epochs and the evaluations, for the split sizes of the
  config's dataset (or ``clips``).

It reads the config's dataset, or the generated stand-in at the config's sizes (epamx.data.generated), and says
which. One process: under torchrun each process takes about 1/N of an epoch (communication not counted).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from epamx import distributed as D
from epamx.config import STAGES, Config
from epamx.inference.evaluation import resolve_amp
from epamx.inference.inputs import build_batch_transform
from epamx.inference.loading import resolve_channels_last
from epamx.models.streams import build_model, modalities, stream_logits

__all__ = ["StagePlan", "format_plan", "plan_run"]

_HEADROOM = 0.9  # of the memory available, what a batch may use


@dataclass
class StagePlan:
    mode: str
    pipeline: str
    batch_size: int                   # the config's
    measured_batch: int               # the batch the figures are for (the config's, or the advised one)
    fits: bool
    advised_batch: Optional[int]      # the largest that fits, when the config's does not
    needed_memory: int                # bytes the config's batch needs (measured, or estimated when it does not fit)
    train_clips_per_s: float
    eval_clips_per_s: float
    peak_memory: int                  # bytes
    memory_available: int             # bytes (CUDA: the device's total; CPU: available + this process's)
    load_s_per_clip: float            # one clip through the pipeline's worker side, in one process
    workers: int
    workers_needed: int
    data_wait: float                  # fraction of the measured iterations spent waiting for a batch
    epochs: int
    evaluations: int
    train_clips: int
    val_clips: int
    train_s: float                    # the schedule's training time
    eval_s: float                     # the schedule's evaluation time

    @property
    def schedule_s(self) -> float:
        return self.train_s + self.eval_s


# ---- memory ------------------------------------------------------------------------------------------------------

def _cpu_peak_reset() -> bool:
    """Reset this process's peak resident memory (Linux: /proc/self/clear_refs 5); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_available() -> int:
    """Bytes this process could grow to: MemAvailable plus what it holds now."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", 0) + _proc_status("VmRSS")
    except OSError:
        return 0


class _Peak:
    """The peak memory of what runs inside ``with``."""

    def __init__(self, device: torch.device):
        self.device, self.value = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _cpu_peak_reset():
            self.device = None  # no reset: report the process's lifetime peak
        return self

    def __exit__(self, *exc):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.value = torch.cuda.max_memory_allocated(self.device)
        else:
            self.value = _proc_status("VmHWM")
        return False


def _available(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return _cpu_available()


# ---- one stage ---------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Trial:
    """A stage's model, optimiser and input transform, to run iterations of a given batch size."""

    def __init__(self, cfg: Config, mode: str, num_classes: int, device: torch.device):
        recipe = cfg.stage(mode)
        self.device, self.recipe = device, recipe
        self.channels_last = resolve_channels_last(cfg.model.channels_last, device)
        fmt = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        self.model = build_model(mode, num_classes, cfg.model.pose_channels, cfg.model.fused, cfg.model.dropout)
        self.model = self.model.to(device, memory_format=fmt).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=recipe.lr_per_16 * recipe.batch_size / 16,
                                         momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                                         nesterov=recipe.nesterov)
        self.amp = resolve_amp(recipe.amp, device)
        self.transform = build_batch_transform(cfg, mode, device)

    def inputs(self, batch):
        return self.transform(batch, self.device, self.channels_last)

    def step(self, batch) -> float:
        """One training iteration (inputs, forward, loss, backward, clipping, SGD step); its seconds."""
        start = time.perf_counter()
        imgs, heatmaps, labels = self.inputs(batch)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            logits = stream_logits(self.model, imgs, heatmaps)
        loss = sum(F.cross_entropy(v.float(), labels) for v in logits.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.recipe.clip_grad if self.recipe.clip_grad > 0 else math.inf)
        self.optimizer.step()
        _sync(self.device)
        return time.perf_counter() - start

    @torch.no_grad()
    def evaluate(self, batch) -> float:
        """One evaluation forward pass of a batch; its seconds."""
        self.model.eval()
        try:
            start = time.perf_counter()
            imgs, heatmaps, _ = self.inputs(batch)
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                stream_logits(self.model, imgs, heatmaps)
            _sync(self.device)
            return time.perf_counter() - start
        finally:
            self.model.train()


def _batches(dataset, batch_size: int, count: int, seed: int, workers: int, pin_memory: bool):
    """``count`` training batches of ``batch_size`` clips, the dataset repeated as often as needed (a stand-in
    holds only a few clips), through a DataLoader with the config's workers."""
    from epamx.data import collate_clips
    from epamx.data.dataset import _worker_init
    from epamx.data.sampler import sample_seed

    keys = [(i % len(dataset), sample_seed(seed, 0, i)) for i in range(batch_size * count)]
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=keys, num_workers=workers,
                                       collate_fn=collate_clips, pin_memory=pin_memory,
                                       worker_init_fn=_worker_init if workers > 0 else None)


def _one_batch(dataset, batch_size: int, seed: int):
    from epamx.data import collate_clips
    from epamx.data.sampler import sample_seed

    return collate_clips([dataset[(i % len(dataset), sample_seed(seed, 1, i))] for i in range(batch_size)])


def _fits(trial: _Trial, dataset, batch_size: int, seed: int) -> Tuple[bool, int]:
    """Whether one iteration of ``batch_size`` runs (CUDA: out of memory is caught), and its peak memory."""
    try:
        with _Peak(trial.device) as peak:
            trial.step(_one_batch(dataset, batch_size, seed))
        return True, peak.value
    except torch.cuda.OutOfMemoryError:
        trial.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return False, 0


def _choose_batch(trial: _Trial, dataset, batch_size: int, seed: int) -> Tuple[int, Optional[int], int]:
    """The batch to measure, the advised one when the config's does not fit (else None), and the memory the
    config's batch needs (0 when it fits: measured later)."""
    available = _available(trial.device) * _HEADROOM
    fits1, peak1 = _fits(trial, dataset, 1, seed)
    if not fits1:
        raise RuntimeError(f"[{trial.recipe.mode}] even one clip per batch does not fit on {trial.device}")
    if batch_size == 1:
        return 1, None, 0
    fits2, peak2 = _fits(trial, dataset, 2, seed)
    per_clip = max(peak2 - peak1, 1) if fits2 else peak1
    estimate = int(max(1, (available - peak1) // per_clip + 1)) if fits2 else 1
    if trial.device.type == "cuda":
        if _fits(trial, dataset, batch_size, seed)[0]:
            return batch_size, None, 0
        low, high = 1 if not fits2 else 2, batch_size  # fits, does not fit
        guess = min(max(estimate, low), high - 1)
        while high - low > 1:
            if _fits(trial, dataset, guess, seed)[0]:
                low = guess
            else:
                high = guess
            guess = (low + high) // 2
        return low, low, 0
    needed = peak1 + per_clip * (batch_size - 1)
    if needed <= available:
        return batch_size, None, 0
    return estimate, estimate, needed


def _load_time(dataset, clips: int, seed: int) -> float:
    """Seconds to read one clip through the pipeline's worker side (decode, sample, crop), in this process."""
    from epamx.data.sampler import sample_seed

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker
    try:
        dataset[(0, sample_seed(seed, 2, 0))]  # the first opens files and warms caches
        start = time.perf_counter()
        for i in range(clips):
            dataset[(i % len(dataset), sample_seed(seed, 2, i + 1))]
        return (time.perf_counter() - start) / clips
    finally:
        torch.set_num_threads(threads)


def _plan_stage(cfg: Config, mode: str, device: torch.device, iters: int, clips: Optional[Tuple[int, int]]
                ) -> StagePlan:
    from epamx.data import build_dataset

    recipe, streams, seed = cfg.stage(mode), modalities(mode), cfg.train.seed
    train_set = build_dataset(cfg.data, cfg.data.train_split, train=True, modalities=streams,
                              num_classes=cfg.model.num_classes or None, progress=False, pipeline=recipe.pipeline)
    val_size = len(build_dataset(cfg.data, cfg.data.val_split, train=False, modalities=streams,
                                 num_classes=train_set.num_classes, progress=False, pipeline=recipe.pipeline))
    torch.manual_seed(seed)
    trial = _Trial(cfg, mode, train_set.num_classes, device)
    batch, advised, needed_memory = _choose_batch(trial, train_set, recipe.batch_size, seed)
    workers = cfg.train.workers
    loader = _batches(train_set, batch, iters + 1, seed, workers, device.type == "cuda")
    waits, steps = [], []
    with _Peak(device) as peak:
        start = time.perf_counter()
        for i, data in enumerate(loader):
            waits.append(time.perf_counter() - start)
            steps.append(trial.step(data))
            if i == 0:
                last_batch = data
            start = time.perf_counter()
    waits, steps = waits[1:], steps[1:]  # the first waited for the workers to start
    compute = sum(steps) / len(steps)
    evaluate = min(trial.evaluate(last_batch) for _ in range(2))
    load = _load_time(train_set, min(batch, 4), seed)
    needed = max(1, math.ceil(load * batch / compute))
    train_clips, val_clips = clips if clips else (len(train_set), val_size)
    epochs = recipe.epochs
    every = cfg.train.eval_every_epochs
    evaluations = epochs // every + (1 if epochs % every else 0) if every else 1
    # the loader and the model overlap: an iteration takes the longer of the compute and the workers' reading
    per_iter = max(compute, load * batch / workers) if workers else compute + load * batch
    per_eval_clip = max(evaluate / batch, load / workers) if workers else evaluate / batch + load
    return StagePlan(
        mode=mode, pipeline=recipe.pipeline, batch_size=recipe.batch_size, measured_batch=batch,
        fits=advised is None, advised_batch=advised, needed_memory=needed_memory or peak.value,
        train_clips_per_s=batch / compute,
        eval_clips_per_s=batch / evaluate, peak_memory=peak.value, memory_available=_available(device),
        load_s_per_clip=load, workers=workers, workers_needed=needed,
        data_wait=sum(waits) / (sum(waits) + sum(steps)), epochs=epochs, evaluations=evaluations,
        train_clips=train_clips, val_clips=val_clips, train_s=epochs * (train_clips // batch) * per_iter,
        eval_s=evaluations * val_clips * per_eval_clip)


def plan_run(cfg: Config, iters: int = 3, clips: Optional[Tuple[int, int]] = None) -> List[StagePlan]:
    """Measure ``iters`` training iterations (after one warm-up) of each stage ``cfg`` trains, on its device, and
    return what they say (see the module docstring). ``clips`` = (training, held-out) clips the schedule is for;
    default the config's split sizes."""
    if iters < 1:
        raise ValueError(f"plan: iters must be >= 1, got {iters}")
    info = D.init_distributed(cfg.train.device)
    stages = STAGES if cfg.train.mode == "all" else (cfg.train.mode,)
    return [_plan_stage(cfg, mode, info.device, iters, clips) for mode in stages]


# ---- the report --------------------------------------------------------------------------------------------------

def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = int(round(seconds / 60))
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
    except OSError:
        model = "CPU"
    return f"{model}, {torch.get_num_threads()} threads"


def format_plan(plans: Sequence[StagePlan], config_name: str, device: torch.device, data: str,
                clips_given: bool, generated: bool = False) -> str:
    """The plan as text: a header saying what was measured on what, a row per stage, the total and the advice."""
    lines = [f"plan for {config_name} on {device} ({device_name(device)}; torch {torch.__version__})",
             f"data measured: {data}"]
    if plans:
        p = plans[0]
        source = "given (--plan-clips)" if clips_given else "the measured data's splits"
        if generated and not clips_given:
            source += ", not the real dataset's: give its sizes with --plan-clips TRAIN,VAL"
        lines.append(f"schedule for {p.train_clips:,} training and {p.val_clips:,} held-out clips ({source}); one "
                     f"process")
    memory = "CUDA allocator peak" if device.type == "cuda" else "peak resident memory of this process"
    lines.append(f"memory: {memory}")
    lines.append("")
    header = (f"{'stage':<8}{'pipeline':<12}{'batch':>6}{'train clips/s':>15}{'eval clips/s':>14}"
              f"{'peak memory':>13}{'load ms/clip':>14}{'workers':>9}{'needed':>8}{'data wait':>11}{'epochs':>8}"
              f"{'schedule':>13}")
    lines.append(header)
    for p in plans:
        batch = f"{p.measured_batch}" + ("*" if not p.fits else "")
        lines.append(f"{p.mode:<8}{p.pipeline:<12}{batch:>6}{p.train_clips_per_s:>15.2f}{p.eval_clips_per_s:>14.2f}"
                     f"{_gib(p.peak_memory):>13}{1000 * p.load_s_per_clip:>14.1f}{p.workers:>9}{p.workers_needed:>8}"
                     f"{100 * p.data_wait:>10.0f}%{p.epochs:>8}{_duration(p.schedule_s):>13}")
    total = sum(p.schedule_s for p in plans)
    lines.append("")
    lines.append(f"whole schedule: {_duration(total)} on this machine (training "
                 f"{_duration(sum(p.train_s for p in plans))}, evaluation {_duration(sum(p.eval_s for p in plans))})")
    advice = []
    for p in plans:
        if not p.fits:
            estimate = f"about {_gib(p.needed_memory)}, " if p.needed_memory > p.peak_memory else ""
            advice.append(f"[{p.mode}] batch {p.batch_size} does not fit ({estimate}{_gib(p.memory_available)} "
                          f"available, {100 * _HEADROOM:.0f}% usable): the largest that fits is {p.advised_batch} "
                          f"(stages.{p.mode}.batch_size={p.advised_batch}; its row, marked *, is at that batch)")
        if p.workers_needed > p.workers:
            advice.append(f"[{p.mode}] the data loader is the bottleneck: reading a clip takes "
                          f"{p.load_s_per_clip:.3f} s, so {p.workers_needed} workers keep up with this device "
                          f"(train.workers = {p.workers})")
    if advice:
        lines.append("advice:")
        lines += [f"  {a}" for a in advice]
    else:
        lines.append("advice: none; every batch fits and the loader keeps up")
    return "\n".join(lines)


def plan_json(plans: Sequence[StagePlan]) -> List[Dict[str, Any]]:
    return [{**asdict(p), "schedule_s": p.schedule_s} for p in plans]
