"""One epoch of training: ``train_one_epoch`` over a DataLoader, and the per-iteration cosine schedule.

Resuming is exact: the data position is the sampler's ``set_epoch(epoch, skip)``, each clip's augmentation comes
from its own seed (epamx.data.sampler), and the DataLoader's own draw from torch's RNG (its workers' base seed) is
taken outside the model's RNG stream, so where an epoch's iterator is created does not change the dropout masks
that follow.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from epamx import distributed as D
from epamx.inference.evaluation import progress_bar, rng_untouched
from epamx.models.streams import model_mode, stream_logits
from epamx.train.signals import StopFlag

__all__ = ["EpochResult", "cosine_schedule", "train_one_epoch"]


def cosine_schedule(optimizer: torch.optim.Optimizer, total_iters: int, warmup_iters: int = 0,
                    min_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule (call ``step()`` after every optimiser step): cosine from each parameter group's lr
    down to ``min_lr`` at ``total_iters`` (mmcv's CosineAnnealing by iteration), with a linear warm-up over the
    first ``warmup_iters`` steps that trains step i at (i + 1) / warmup_iters of the cosine's lr."""
    total_iters = max(1, int(total_iters))

    def schedule(base: float) -> Callable[[int], float]:
        floor = min_lr / base if base > 0 else 0.0

        def factor(step: int) -> float:
            cosine = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step, total_iters) / total_iters))
            if step < warmup_iters:
                return cosine * (step + 1) / warmup_iters
            return cosine

        return factor

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule(g["lr"]) for g in optimizer.param_groups])


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


def _optimisation_step(model: nn.Module, imgs, heatmaps, labels, optimizer: torch.optim.Optimizer, scheduler,
                       params: List[torch.Tensor], scaler: Optional[torch.amp.GradScaler],
                       amp_dtype: Optional[torch.dtype], clip_grad: float):
    """Forward, the summed cross-entropy of each stream, backward, clipping, one optimiser and one schedule step.
    Returns ({stream: loss}, the total loss, the gradients' norm before clipping, the lr the step ran at)."""
    scaling = scaler is not None and scaler.is_enabled()
    device_type = labels.device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
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
    return losses, loss, grad_norm, lr


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
    ``stop.requested`` on any rank. A non-finite loss raises FloatingPointError.
    """
    if model_mode(model) != mode:
        raise ValueError(f"train_one_epoch: mode {mode!r}, but the model is a {model_mode(model)} model")
    model.train()
    loader.sampler.set_epoch(epoch, skip=start_iter * loader.batch_size)
    world = D.get_world_size()
    params = [p for p in model.parameters() if p.requires_grad]
    bar = progress_bar(start_iter + len(loader), desc, progress, initial=start_iter)
    iteration, losses_seen, stopped = start_iter, [], False
    with rng_untouched():
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
            losses, loss, grad_norm, lr = _optimisation_step(model, imgs, heatmaps, labels, optimizer, scheduler,
                                                             params, scaler, amp_dtype, clip_grad)
            iteration += 1
            names = list(losses)
            values, stop_now = _reduce([loss.item()] + [losses[n].item() for n in names] + [grad_norm.item()],
                                       bool(stop is not None and stop.requested))
            if not math.isfinite(values[0]):
                raise FloatingPointError(f"the training loss is {values[0]} at epoch {epoch + 1}, iteration "
                                         f"{iteration} (step {scheduler.last_epoch}): training diverged; lower "
                                         f"optim.lr_per_16 or resume from an earlier checkpoint")
            record = {"type": "train", "epoch": epoch, "iter": iteration, "step": scheduler.last_epoch,
                      "loss": values[0], **{f"loss_{n}": v for n, v in zip(names, values[1:-1])}, "lr": lr,
                      "grad_norm": values[-1],
                      "clips_per_s": labels.shape[0] * world / max(time.perf_counter() - tick, 1e-9), "data_s": data_s}
            if batch.get("skipped"):
                record["skipped"] = int(batch["skipped"])
            losses_seen.append(values[0])
            if bar is not None:
                bar.set_postfix(loss=f"{values[0]:.3f}", lr=f"{lr:.2e}", clips_s=f"{record['clips_per_s']:.1f}",
                                refresh=False)
                bar.update(1)
            if on_iteration is not None:
                on_iteration(record)
            # on_iteration may have asked to stop; under DDP such a request is agreed on at the next iteration
            if stop_now or (world == 1 and stop is not None and stop.requested):
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
