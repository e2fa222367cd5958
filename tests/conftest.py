"""Shared fixtures: the devices to test on, dtypes with their tolerances, and poisoned allocations."""
import contextlib

import pytest
import torch

import epamx  # noqa: F401  (registers torch.ops.epamx)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (rtol, atol) for ops that compute; ops that only move data must match bit for bit.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=FLOAT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


@contextlib.contextmanager
def poisoned_allocations():
    """Inside, every tensor torch allocates uninitialised (at::empty) is filled with NaN, so an output element
    a kernel forgets to write shows up as NaN instead of whatever the allocator happened to hand out."""
    import torch.utils.deterministic as det

    previous = (torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        det.fill_uninitialized_memory = previous[1]


def on_busy_side_stream(fn, *tensors):
    """fn(*copies of tensors) on a CUDA side stream kept busy until the copies are written: a kernel launched on
    any other stream than the current one would read the zeros the copies start as."""
    copies = [torch.zeros_like(t) for t in tensors]
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)
        for copy, tensor in zip(copies, tensors):
            copy.copy_(tensor)
        out = fn(*copies)
    stream.synchronize()
    return out
