"""epamx.memory.cpu_cache: large CPU buffers are reused across scopes, small ones and everything outside a scope
are left to PyTorch, the reserve stays bounded, and results computed inside a scope equal those outside."""
import threading

import pytest
import torch
import torch.nn.functional as F

from epamx.memory import cpu_cache, cpu_cache_enter, cpu_cache_exit, cpu_cache_stats, empty_cpu_cache

MIB = 1 << 20


@pytest.fixture(autouse=True)
def empty_cache():
    empty_cpu_cache()
    yield
    empty_cpu_cache()


def _floats(nbytes):
    return nbytes // 4


def _freed_buffer(nbytes):
    """The address of a float tensor of nbytes, allocated and freed at once."""
    a = torch.empty(_floats(nbytes))
    address = a.data_ptr()
    del a
    return address


def test_a_freed_buffer_serves_the_next_request_of_its_size():
    with cpu_cache():
        first = _freed_buffer(3 * MIB)
        b = torch.empty(_floats(3 * MIB))
        assert b.data_ptr() == first
        stats = cpu_cache_stats()
        assert stats["active"] and stats["depth"] == 1
        assert stats["hits"] >= 1 and stats["in_use_bytes"] >= 3 * MIB
    assert not cpu_cache_stats()["active"]


def test_a_slightly_smaller_request_reuses_a_larger_free_buffer_but_a_much_smaller_one_does_not():
    with cpu_cache():
        first = _freed_buffer(8 * MIB)
        near = torch.empty(_floats(7 * MIB))
        assert near.data_ptr() == first
        del near
        far = torch.empty(_floats(2 * MIB))
        assert far.data_ptr() != first


def test_small_buffers_and_tensors_outside_a_scope_bypass_the_cache():
    before = cpu_cache_stats()
    torch.empty(_floats(4 * MIB))
    with cpu_cache():
        torch.empty(1000)
    after = cpu_cache_stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
    assert after["min_bytes"] == 128 * 1024


def test_size_classes_round_up_by_at_most_a_sixteenth():
    from epamx._extension import load_extension
    size_class = load_extension()._cpu_cache_size_class
    for n in (128 * 1024, 128 * 1024 + 1, 300 * 1024 + 5, MIB, MIB + 1, 3 * MIB + 12345, 100 * MIB - 7, (1 << 30) + 1):
        c = size_class(n)
        assert n <= c <= n + n / 16 + 1


def test_values_written_in_a_scope_survive_it_and_buffers_freed_outside_return_to_the_cache():
    g = torch.Generator().manual_seed(0)
    want = torch.randn(_floats(2 * MIB), generator=g)
    with cpu_cache():
        kept = want.clone()
    torch.testing.assert_close(kept, want, rtol=0, atol=0)
    free_before = cpu_cache_stats()["free_bytes"]
    del kept
    assert cpu_cache_stats()["free_bytes"] >= free_before + 2 * MIB


def test_scopes_nest_and_an_unmatched_exit_is_an_error():
    with cpu_cache():
        with cpu_cache():
            assert cpu_cache_stats()["depth"] == 2
        assert cpu_cache_stats()["active"]
    assert cpu_cache_stats()["depth"] == 0
    with pytest.raises(RuntimeError, match="exit without a matching enter"):
        cpu_cache_exit()
    cpu_cache_enter()
    cpu_cache_exit()


def test_buffers_unused_for_two_scopes_are_released():
    with cpu_cache():
        torch.empty(_floats(5 * MIB))  # freed at once
    assert cpu_cache_stats()["free_bytes"] >= 5 * MIB
    with cpu_cache():
        pass
    assert cpu_cache_stats()["free_bytes"] >= 5 * MIB  # the scope before used it
    with cpu_cache():
        pass
    assert cpu_cache_stats()["free_bytes"] == 0


def test_empty_releases_free_buffers_but_not_live_ones():
    with cpu_cache():
        live = torch.ones(_floats(2 * MIB))
        torch.empty(_floats(3 * MIB))  # freed at once
    empty_cpu_cache()
    stats = cpu_cache_stats()
    assert stats["free_bytes"] == 0 and stats["in_use_bytes"] >= 2 * MIB
    assert live.sum().item() == live.numel()


def test_changing_shapes_keep_the_reserve_bounded():
    for step in range(12):
        with cpu_cache():
            # Shapes that never repeat: without eviction every one would add to the reserve.
            held = [torch.empty(_floats((2 + step) * MIB + k * 4096)) for k in range(3)]
            del held
    stats = cpu_cache_stats()
    assert stats["free_bytes"] + stats["in_use_bytes"] <= 4 * stats["peak_in_use_bytes"]


def test_onednn_convolution_in_a_scope_equals_outside_and_reuses_buffers():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, 9, 37, 41, generator=g).to(memory_format=torch.channels_last_3d)
    w = torch.randn(54, 24, 1, 1, 1, generator=g).to(memory_format=torch.channels_last_3d)
    dw = torch.randn(54, 1, 1, 3, 3, generator=g).to(memory_format=torch.channels_last_3d)

    def run():
        y = F.relu(F.conv3d(x, w))
        return F.conv3d(y, dw, padding=(0, 1, 1), groups=54).mean(dim=(2, 3, 4))

    with torch.no_grad():
        want = run()
        for _ in range(3):
            with cpu_cache():
                got = run()
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert cpu_cache_stats()["hits"] > 0


def test_threads_allocating_in_one_scope_each_get_their_own_buffers():
    errors = []

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            for _ in range(20):
                a = torch.full((_floats(2 * MIB),), float(seed))
                b = torch.randn(_floats(MIB) + 17, generator=g)
                assert torch.all(a == seed)
                del a, b
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)

    with cpu_cache():
        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert cpu_cache_stats()["in_use_bytes"] == 0
