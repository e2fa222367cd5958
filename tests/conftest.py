"""Shared fixtures: the devices and dtypes to test on (the helpers the tests import are in testkit.py); the packages the
tests need, checked at start-up (see TEST_REQUIREMENTS); the check that CI skips nothing but GPU tests."""
import importlib.util
import os
import re

import pytest
import torch

import epamx  # noqa: F401  (registers torch.ops.epamx)
from testkit import DEVICES, FLOAT_DTYPES, TEST_REQUIREMENTS


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=FLOAT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


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
