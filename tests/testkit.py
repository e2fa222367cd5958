"""What the tests share beyond fixtures: the devices and dtypes, tolerances, the packages they need, one intra-op
thread, poisoned allocations, errors that name their facts, a busy side stream. Tests import these from here, never
from conftest: with several conftest.py files, the module `conftest` is whichever one pytest loaded last."""
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


@contextlib.contextmanager
def one_thread():
    """One intra-op thread inside: two threads on a shared two-core machine can spin in OpenMP barriers for
    minutes, and the end-to-end tests' results must not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def without_onednn_bfloat16():
    """Inside, this machine as a CPU where PyTorch refuses oneDNN's bfloat16 convolutions (an AVX2-only one):
    epamx.nn.conv_act runs bfloat16 through oneDNN's float32 convolution, with packed weights of its own (a fresh
    cache, so none packed outside is reused). Yields the module epamx.nn.conv_act (epamx.nn.conv_act is the
    function)."""
    import importlib
    import weakref

    module = importlib.import_module("epamx.nn.conv_act")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "_ONEDNN_BF16", False)
        patch.setattr(module, "_PACKED", weakref.WeakKeyDictionary())
        yield module


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


@contextlib.contextmanager
def raises_naming(exception, *facts):
    """pytest.raises(exception) whose message names each of `facts` (a number, a name, a path), in whatever words."""
    with pytest.raises(exception) as info:
        yield info
    missing = [fact for fact in map(str, facts) if fact not in str(info.value)]
    assert not missing, f"the message does not name {missing}: {info.value}"


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


# The packages of the `train` and `dev` extras (module: pip name; pytest aside, and ruff, the linter, which no test
# uses): the tests need them all, and a session without one stops at start-up. A machine that cannot have one names
# its module in EPAMX_TEST_WITHOUT (comma-separated: the GPU machine has no PyAV, so `av`); a test that fails for want
# of it is then reported as skipped, with the reason. Optional extras (tensorboard) are not checked here: the tests
# that need one skip with pytest.importorskip.
TEST_REQUIREMENTS = {"av": "av", "PIL": "pillow", "tqdm": "tqdm", "matplotlib": "matplotlib",
                     "pytest_benchmark": "pytest-benchmark"}
