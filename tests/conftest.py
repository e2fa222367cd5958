"""Shared fixtures: the devices to test on, dtypes with their tolerances, and poisoned allocations; the packages the
tests need, checked at start-up (see TEST_REQUIREMENTS); the check that CI skips nothing but GPU tests."""
import contextlib
import importlib.util
import os
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
INSTALL_COMMAND = 'pip install -e ".[train,dev]" --no-build-isolation'
_left_out = set()  # modules named in EPAMX_TEST_WITHOUT that are indeed not installed


def _installed(module):
    return importlib.util.find_spec(module) is not None


def _package(module):
    name = TEST_REQUIREMENTS[module]
    return name if name == module else f"{name} (module {module})"


def pytest_configure(config):
    without = {name.strip() for name in os.environ.get("EPAMX_TEST_WITHOUT", "").split(",") if name.strip()}
    unknown = sorted(without - TEST_REQUIREMENTS.keys())
    if unknown:
        raise pytest.UsageError(f"EPAMX_TEST_WITHOUT names {', '.join(unknown)}; it takes the modules "
                                f"{', '.join(TEST_REQUIREMENTS)}")
    missing = [module for module in TEST_REQUIREMENTS if module not in without and not _installed(module)]
    if missing:
        names = ", ".join(map(_package, missing))
        raise pytest.UsageError(
            f"the tests need {names}, not installed here. Install the extras: {INSTALL_COMMAND}\n"
            f"(a machine that cannot have one: EPAMX_TEST_WITHOUT={','.join(missing)} skips the tests that need it)")
    _left_out.update(module for module in without if not _installed(module))


# "No module named 'av'"; "import of av halted" (None in sys.modules); a DataLoader worker's error is re-raised in
# the main process with its message only, so the message is read too.
_MISSING_MODULE = re.compile(r"No module named '([\w.]+)'|import of ([\w.]+) halted")


def _left_out_cause(exc):
    """The left-out module whose absence raised `exc` (or an exception it was raised from), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = [exc.name] if isinstance(exc, ImportError) and exc.name else []
        names += [a or b for a, b in _MISSING_MODULE.findall(str(exc))]
        for name in names:
            if name.split(".")[0] in _left_out:
                return name.split(".")[0]
        exc = exc.__cause__ or exc.__context__
    return None


def _skip_reason(module):
    return f"needs {_package(module)}, left out by EPAMX_TEST_WITHOUT"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _left_out and report.failed and call.excinfo is not None:
        module = _left_out_cause(call.excinfo.value)
        if module is not None:
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0, _skip_reason(module))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _left_out and report.failed:
        # A test module that imports a left-out package (or epamx.data, which imports Pillow) at its top.
        modules = [a or b for a, b in _MISSING_MODULE.findall(str(report.longrepr))]
        module = next((m.split(".")[0] for m in modules if m.split(".")[0] in _left_out), None)
        if module is not None:
            report.outcome = "skipped"
            report.longrepr = (str(collector.path), 0, _skip_reason(module))


# With EPAMX_ONLY_GPU_SKIPS=1 (CI) the run fails if a test was skipped for any reason but a missing GPU.
_GPU_REASON = re.compile(r"\b(cuda|gpus?)\b", re.IGNORECASE)
_skips = []  # (node id, reason)


def _record_skip(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append((report.nodeid, reason))


def pytest_collectreport(report):
    _record_skip(report)


def pytest_runtest_logreport(report):
    _record_skip(report)


def _skips_not_for_a_gpu():
    if os.environ.get("EPAMX_ONLY_GPU_SKIPS") != "1":
        return []
    return [(nodeid, reason) for nodeid, reason in _skips if not _GPU_REASON.search(reason)]


def pytest_sessionfinish(session, exitstatus):
    if _skips_not_for_a_gpu() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    others = _skips_not_for_a_gpu()
    if others:
        terminalreporter.section("EPAMX_ONLY_GPU_SKIPS=1: skipped for another reason than a missing GPU", red=True)
        for nodeid, reason in others:
            terminalreporter.line(f"{nodeid}: {reason}")
        terminalreporter.line(f"{len(others)} such skips: the run fails")
