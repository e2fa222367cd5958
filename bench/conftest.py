"""pytest-benchmark harness: every case is timed against its reference in the same run, and the session ends with
a table of speed-ups and bandwidth (also written as markdown with --bench-table PATH).

    pytest bench --bench-table bench/results/cpu.md
    pytest bench --benchmark-only -k temporal_shift
"""
from __future__ import annotations

import collections
import datetime
import os
import platform

import pytest
import torch

import epamx

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and epamx.build_info()["cuda"] else [])
_RESULTS: dict = collections.OrderedDict()
_METRICS: list = []


def pytest_addoption(parser):
    parser.addoption("--bench-table", default=None, help="write the results table (markdown) to this path")
    parser.addoption("--bench-threads", type=int, default=2, help="CPU threads (default 2, as the dev machines)")


def pytest_configure(config):
    torch.set_num_threads(config.getoption("--bench-threads"))


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def measure(benchmark):
    """measure(op, case, impl, fn, bytes_moved, device): time fn() with pytest-benchmark and record it; the
    table's ratio is against impl "reference" of the same op and case (bytes_moved 0: no bandwidth column). On CUDA each round runs fn `cuda_calls` times between synchronisations, so launch latency
    and the synchronisation itself are not counted as kernel time."""

    def run(op, case, impl, fn, bytes_moved, device, cuda_calls=20):
        calls = cuda_calls if device.type == "cuda" else 1
        if device.type == "cuda":
            def timed():
                for _ in range(calls):
                    fn()
                torch.cuda.synchronize(device)
            timed()
        else:
            timed = fn
        benchmark.group = f"{op} {case}"
        benchmark.extra_info.update(impl=impl, bytes=bytes_moved, calls_per_round=calls)
        benchmark(timed)
        seconds = benchmark.stats.stats.median / calls
        _RESULTS[(op, device.type, case, impl)] = (seconds, bytes_moved)

    return run


@pytest.fixture
def record_metric():
    """record_metric(what, case, value_text): a measurement other than time, listed under the table."""
    def record(what, case, value):
        _METRICS.append((what, case, value))
    return record


def _environment() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            cpu += f", L3 {f.read().strip()}"
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if "cuda" in DEVICES else ""
    return (f"{datetime.date.today()}, epamx {epamx.__version__}, torch {torch.__version__}, CPU {cpu} "
            f"({torch.get_num_threads()} threads){gpu}")


def _table() -> list[str]:
    lines = ["| op | device | case | impl | median | vs reference | GB/s | vs copy |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for (op, dev, case, impl), (seconds, nbytes) in _RESULTS.items():
        ref = _RESULTS.get((op, dev, case, "reference"))
        copy = _RESULTS.get((op, dev, case, "copy"))
        bandwidth = nbytes / seconds / 1e9
        ratio = f"{ref[0] / seconds:.2f}x" if ref and impl != "reference" else ""
        vs_copy = f"{bandwidth / (copy[1] / copy[0] / 1e9):.0%}" if copy and impl != "copy" else ""
        gbs = f"{bandwidth:.1f}" if nbytes else ""
        lines.append(f"| {op} | {dev} | {case} | {impl} | {seconds * 1e3:.3f} ms | {ratio} | {gbs} | {vs_copy} |")
    if _METRICS:
        lines += ["", "| measurement | case | value |", "|---|---|---|"]
        lines += [f"| {what} | {case} | {value} |" for what, case, value in _METRICS]
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RESULTS and not _METRICS:
        return
    lines = _table()
    terminalreporter.section("epamx: speed-up over the reference measured in the same run")
    terminalreporter.write_line(_environment())
    for line in lines:
        terminalreporter.write_line(line)
    path = config.getoption("--bench-table")
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write("# epamx benchmark results\n\n")
            f.write(f"{_environment()}\n\n")
            f.write("Medians of pytest-benchmark rounds. `vs reference`: the reference's time / this time, both "
                    "measured in this run. `GB/s`: the bytes the op must read and write / time. `vs copy`: that "
                    "bandwidth / a same-size tensor copy's bandwidth in this run (the copy writes into a buffer it "
                    "already has; out-of-place ops allocate their output each call). In-place rows re-process the same "
                    "tensor every round, so on a CPU whose last-level cache holds it they run from cache.\n\n")
            f.write("\n".join(lines) + "\n")
        terminalreporter.write_line(f"table written to {path}")
