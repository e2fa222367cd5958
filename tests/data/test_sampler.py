"""ClipSampler: each epoch's order a function of (seed, epoch) alone, ranks that partition the data, and resuming
inside an epoch."""
import numpy as np
import pytest
import torch

from epamx.data import ClipSampler
from epamx.data.sampler import sample_seed


def test_order_depends_only_on_seed_and_epoch():
    a = ClipSampler(37, shuffle=True, seed=5)
    b = ClipSampler(37, shuffle=True, seed=5)
    for epoch in (3, 0, 3, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        first = list(a)
        list(b)
        assert list(b) == first == list(a), "the same whatever was drawn before"
    orders = set()
    for seed in (5, 6):
        for epoch in range(4):
            a = ClipSampler(37, shuffle=True, seed=seed)
            a.set_epoch(epoch)
            order = [i for i, _ in a]
            assert sorted(order) == list(range(37))
            orders.add(tuple(order))
    assert len(orders) == 8


def test_it_yields_each_clips_seed():
    sampler = ClipSampler(11, shuffle=True, seed=9)
    sampler.set_epoch(4)
    for index, seed in sampler:
        assert seed == sample_seed(9, 4, index) and 0 <= seed < 2 ** 32
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(30)}
    assert len(seeds) == 3 * 3 * 30
    assert ClipSampler(4, shuffle=False).indices().tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("n,world", [(10, 3), (7, 2), (5, 8), (12, 4)])
def test_training_ranks_get_equal_padded_shares(n, world):
    shares = []
    for rank in range(world):
        sampler = ClipSampler(n, shuffle=True, seed=1, rank=rank, world_size=world)
        sampler.set_epoch(2)
        shares.append([i for i, _ in sampler])
    per_rank = -(-n // world)
    assert all(len(s) == per_rank for s in shares)
    everything = [i for s in shares for i in s]
    assert set(everything) == set(range(n)), "every clip is seen"
    counts = np.bincount(everything, minlength=n)
    assert counts.max() - counts.min() <= -(-per_rank * world // n), "padding repeats clips evenly"
    single = ClipSampler(n, shuffle=True, seed=1)
    single.set_epoch(2)
    order = np.resize([i for i, _ in single], per_rank * world)
    assert [order[r::world].tolist() for r in range(world)] == shares, "rank r takes every world-th of the order"


@pytest.mark.parametrize("n,world", [(10, 3), (7, 2), (5, 8)])
def test_evaluation_ranks_see_every_clip_exactly_once(n, world):
    shares = [[i for i, _ in ClipSampler(n, shuffle=False, rank=rank, world_size=world)] for rank in range(world)]
    assert sorted(i for s in shares for i in s) == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("shuffle", [True, False])
def test_resuming_inside_an_epoch(shuffle):
    sampler = ClipSampler(23, shuffle=shuffle, seed=4, rank=1, world_size=2)
    sampler.set_epoch(6)
    full = list(sampler)
    assert len(sampler) == len(full) == (12 if shuffle else 11)
    for skip in (0, 1, 5, len(full) - 1, len(full), len(full) + 3):
        resumed = ClipSampler(23, shuffle=shuffle, seed=4, rank=1, world_size=2)
        resumed.set_epoch(6, skip)
        assert list(resumed) == full[skip:]
        assert len(resumed) == max(0, len(full) - skip)
    sampler.set_epoch(7)
    assert sampler.skip == 0, "a new epoch starts from its beginning"


def test_a_resumed_loader_gives_the_remaining_batches():
    class Keys(torch.utils.data.Dataset):
        def __len__(self):
            return 17

        def __getitem__(self, key):
            return torch.tensor(key)

    def batches(skip):
        sampler = ClipSampler(17, shuffle=True, seed=2)
        sampler.set_epoch(1, skip)
        return [b.tolist() for b in torch.utils.data.DataLoader(Keys(), batch_size=3, sampler=sampler)]

    full = batches(0)
    assert batches(6) == full[2:]


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        ClipSampler(0, shuffle=True)
    with pytest.raises(ValueError, match="rank"):
        ClipSampler(5, shuffle=True, rank=2, world_size=2)
    with pytest.raises(ValueError, match="skip"):
        ClipSampler(5, shuffle=True).set_epoch(0, -1)
