"""Shared fixtures: the devices to test on, dtypes with their tolerances, and poisoned allocations; tests that need
an optional package that is not installed are reported as skipped, with the package named."""
import contextlib
import importlib.util
import re

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


# Packages only the data and training layers import, where they are used. A machine may lack one (the GPU machines
# have no PyAV): a test that fails only because such a package is missing is reported as skipped, naming it.
OPTIONAL_PACKAGES = {"av": "PyAV", "PIL": "Pillow", "matplotlib": "matplotlib", "tqdm": "tqdm"}


def _missing_optional_package(exc):
    """The optional package whose absence raised `exc` (or an exception it was raised from), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = [exc.name] if isinstance(exc, ImportError) and exc.name else []
        # A DataLoader worker's error is re-raised in the main process with its message only.
        names += re.findall(r"No module named '([\w.]+)'|import of ([\w.]+) halted", str(exc))
        for name in names:
            name = (name if isinstance(name, str) else next(n for n in name if n)).split(".")[0]
            if name in OPTIONAL_PACKAGES and importlib.util.find_spec(name) is None:
                return name
        exc = exc.__cause__ or exc.__context__
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None:
        name = _missing_optional_package(call.excinfo.value)
        if name is not None:
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0,
                               f"needs {OPTIONAL_PACKAGES[name]} ({name}), which is not installed")
