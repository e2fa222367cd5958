"""Distributed set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    torchrun --nproc_per_node 4 -m epamx train --config ntu60_xsub

Without those variables everything runs in one process and every helper here is a no-op. NCCL on CUDA, gloo on
CPU. Rank 0 alone prints, logs and writes (``is_main()``).
"""
from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from epamx.errors import ConfigError

__all__ = ["DistInfo", "all_gather_objects", "barrier", "broadcast_buffers", "get_rank",
           "get_world_size", "init_distributed", "is_main", "resolve_device", "teardown", "unwrap", "wrap_model"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto": cuda:<local_rank> when CUDA is available, else cpu; "cuda" means cuda:<local_rank>."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"train.device = {device!r} is not a device torch knows (auto, cpu, cuda, cuda:1, "
                          f"...)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device = {device!r}, but torch sees no CUDA GPU here (--device cpu)")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
    return resolved


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun described in the environment (idempotent), and pick this process's device.

    Single process (no WORLD_SIZE, or 1): no process group. Otherwise NCCL when the device is CUDA, gloo on CPU.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch was built without torch.distributed")
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world_size} but {name} is not set: launch with torchrun")
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": resolved} if resolved.type == "cuda" else {}))
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world_size, local_rank, resolved)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True in the process that prints, logs and writes (rank 0, or the only process)."""
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def teardown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, sync_bn: bool = False) -> nn.Module:
    """``model`` (already on ``info.device``) for training in ``info.world_size`` processes: with SyncBatchNorm
    when ``sync_bn`` (CUDA only: on CPU each process keeps normalising over its own batch, with a warning), wrapped
    in DistributedDataParallel. The model itself is returned unchanged in a single process."""
    if not info.distributed:
        return model
    if sync_bn:
        if info.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif info.is_main:
            warnings.warn("model.sync_bn: SyncBatchNorm needs CUDA; on CPU each process normalises over its own "
                          "batch", stacklevel=2)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or DataParallel) wrapper, or the model itself."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (batch-norm running statistics) to every rank: without SyncBatchNorm each rank
    keeps its own, and evaluation (which runs outside DDP) must use the ones that are saved."""
    if get_world_size() > 1:
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer.data, src)


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if get_world_size() == 1:
        return [obj]
    gathered: List[Optional[Any]] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
