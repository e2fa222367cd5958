"""Which clips a process reads, in what order, with what randomness: reproducible and resumable.

A training run must continue after a kill with exactly the batches and augmentations it would have seen. So the
order of an epoch is a function of (seed, epoch) alone, and each clip's random draws (frame offsets, flip) come
from a seed that is a function of (seed, epoch, index) alone, never of which worker process reads it or how many
clips that worker read before. The sampler yields ``(index, sample_seed)`` pairs that :class:`ClipDataset`
understands.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np
import torch

__all__ = ["ClipSampler", "sample_seed"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for clip ``index`` in ``epoch`` of a run seeded ``seed`` (NumPy's SeedSequence mixing)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1)[0])


class ClipSampler(torch.utils.data.Sampler):
    """Indices of a dataset of ``num_samples`` clips for one of ``world_size`` processes.

    Training (``shuffle=True``): a permutation drawn from (seed, epoch), padded by repeating its start so every
    process gets the same number of clips (as ``DistributedSampler``), then every ``world_size``-th from ``rank``.
    Evaluation (``shuffle=False``): the dataset in order, split the same way without padding, so every clip is
    seen exactly once across processes.

    ``set_epoch(epoch, skip)`` selects the epoch and drops its first ``skip`` clips of this process (to resume
    inside an epoch). Yields ``(index, sample_seed)``.
    """

    def __init__(self, num_samples: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        if num_samples < 1:
            raise ValueError(f"ClipSampler: the dataset is empty (num_samples={num_samples})")
        if not 0 <= rank < world_size:
            raise ValueError(f"ClipSampler: rank must be in [0, world_size={world_size}), got {rank}")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if skip < 0:
            raise ValueError(f"ClipSampler.set_epoch: skip must be >= 0, got {skip}")
        self.epoch = int(epoch)
        self.skip = int(skip)

    def indices(self) -> np.ndarray:
        """This process's clip indices for the current epoch (before ``skip``)."""
        if not self.shuffle:
            return np.arange(self.rank, self.num_samples, self.world_size)
        order = np.random.RandomState(sample_seed(self.seed, self.epoch, -1 & 0xFFFFFFFF)).permutation(
            self.num_samples)
        per_rank = -(-self.num_samples // self.world_size)
        order = np.resize(order, per_rank * self.world_size)  # repeats from the start, as DistributedSampler pads
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for index in self.indices()[self.skip:]:
            yield int(index), sample_seed(self.seed, self.epoch, int(index))

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.skip)
