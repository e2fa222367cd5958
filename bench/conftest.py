"""pytest-benchmark harness: each case times its implementations interleaved in the same run (bench/harness.py),
and the session ends with a table of same-run ratios, their spread over repeats, and bandwidth (also written as
markdown with --bench-table PATH).

    pytest bench --bench-table bench/results/cpu.md
    pytest bench --benchmark-only -k temporal_shift
    pytest bench --benchmark-disable            # every implementation called once: a smoke run, no timing

In a bench file, one test is one case:

    def test_op(compare, device):
        compare("op", "case (shape) dtype layout", {"reference": f0, "fused": f1, "copy": f2}, device=device,
                bytes_moved=nbytes, baseline="reference", ratios=[("fused", "copy")])

`baseline` names the implementation every row's `vs baseline` ratio is taken against (None: no ratio column);
`ratios` lists extra (impl, over) pairs, each the speed-up of impl over `over`, for the second table. compare
returns the harness.Case: case.seconds(impl), case.ratio(impl, over).median / .low / .high for metrics of one's own.
peak_memory(builder, *args, device=device) measures a call's peak memory in a fresh process (harness.peak_memory).

Threads: torch.set_num_threads and set_num_interop_threads(--bench-threads, default 2), before any parallel work.
The process is not pinned to CPUs by default: on the 2-CPU machines pinning to both (--bench-cpus 0,1) is the
mask it already has and changed nothing measurable, and binding OpenMP threads to cores (OMP_PROC_BIND=true in
the environment) made one of two runs under load much noisier (a bound thread cannot leave a core that another
process holds). --bench-cpus is for larger machines, to keep a run on CPUs nothing else uses.
Timing options: --bench-repeats (5), --bench-min-rounds per repeat (2), --bench-time (1 s of timed rounds per
implementation, which sets the rounds per repeat), --bench-warmup (0.2 s, at least two rounds). pytest-benchmark's
own --benchmark-min-rounds / --benchmark-max-time do not apply.
"""
from __future__ import annotations

import datetime
import os
import platform

import pytest
import torch

import epamx
from harness import Case, Interleaved, PeakMemory, method, peak_memory as _peak_memory, plan_rounds, table, warm_up

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and epamx.build_info()["cuda"] else [])
_CASES: list = []
_METRICS: list = []
_STATE = {"affinity": "not pinned (the scheduler's choice of all CPUs)", "smoke": False}


def pytest_addoption(parser):
    group = parser.getgroup("epamx", "epamx benchmarks (interleaved timing)")
    group.addoption("--bench-table", default=None, help="write the results table (markdown) to this path")
    group.addoption("--bench-threads", type=int, default=2,
                    help="torch intra-op and inter-op threads (default 2, as the dev machines)")
    group.addoption("--bench-cpus", default=None,
                    help="pin the process to these CPUs, e.g. 2,3 (default: not pinned; see bench/conftest.py)")
    group.addoption("--bench-repeats", type=int, default=5, help="repeats (blocks of interleaved rounds) per case")
    group.addoption("--bench-min-rounds", type=int, default=2, help="at least this many rounds per repeat")
    group.addoption("--bench-time", type=float, default=1.0,
                    help="seconds of timed rounds per implementation of a case (sets the rounds per repeat)")
    group.addoption("--bench-warmup", type=float, default=0.2, help="seconds of warm-up rounds (at least one)")


def pytest_configure(config):
    threads = config.getoption("--bench-threads")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # only possible before the first inter-op work; then it stays at its default
        pass
    cpus = config.getoption("--bench-cpus")
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
        _STATE["affinity"] = f"os.sched_setaffinity to CPUs {cpus}"


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def compare(benchmark, request):
    """compare(op, case, impls, *, device, baseline="reference", bytes_moved=0, yardstick="copy", ratios=(),
    cuda_calls=20, repeats=None, min_rounds=None, settle=0.0) -> harness.Case

    Times the callables of `impls` (name -> fn, all on the same inputs) interleaved and records the case for the
    table. bytes_moved: an int for all, or name -> bytes (0: no GB/s). yardstick: the implementation the vs-copy
    column divides by (ignored when absent). On CUDA a timed block is `cuda_calls` calls. The benchmark fixture
    times whole rounds (every implementation once), so pytest-benchmark's own table and JSON show a round's
    time; extra_info holds each implementation's median and ratio. settle: seconds slept (untimed) before each
    timed call (harness.Interleaved)."""
    config = request.config

    def run(op: str, case: str, impls: dict, *, device, baseline="reference", bytes_moved=0, yardstick="copy",
            ratios=(), cuda_calls=20, repeats=None, min_rounds=None, settle=0.0) -> Case:
        device = torch.device(device)
        for name in [baseline] + [n for pair in ratios for n in pair]:
            if name is not None and name not in impls:
                raise KeyError(f"{op} {case}: no implementation {name!r} among {list(impls)}")
        cuda = device.type == "cuda"
        calls = cuda_calls if cuda else 1
        sync = (lambda: torch.cuda.synchronize(device)) if cuda else None
        if benchmark.disabled:
            _STATE["smoke"] = True
            timed = Interleaved(impls, 1, 1, calls, sync, settle=settle)
        else:
            repeats = repeats or config.getoption("--bench-repeats")
            round_seconds = warm_up(impls, config.getoption("--bench-warmup"), calls, sync, settle=settle)
            rounds = plan_rounds(round_seconds, config.getoption("--bench-time") * len(impls), repeats,
                                 min_rounds or config.getoption("--bench-min-rounds"))
            timed = Interleaved(impls, repeats, rounds, calls, sync, settle=settle)
        benchmark.group = f"{op} | {case}"
        benchmark.pedantic(timed.run, args=(1,), rounds=timed.total)
        nbytes = bytes_moved if isinstance(bytes_moved, dict) else {name: bytes_moved for name in impls}
        result = Case(op, device.type, case, timed.samples, baseline, nbytes,
                      yardstick if yardstick in impls else None, tuple(ratios), calls)
        info = {}
        for name in impls:
            info[name] = {"median_s": result.seconds(name)}
            if baseline and name != baseline:
                r = result.ratio(name, baseline)
                info[name].update(vs_baseline=r.median, spread=[r.low, r.high], noise_limited=r.noise_limited)
        benchmark.extra_info.update(impls=info, baseline=baseline, repeats=result.repeats, rounds=result.rounds,
                                    calls_per_block=calls, round="every implementation once, ABBA order")
        _CASES.append(result)
        return result

    return run


@pytest.fixture
def record_metric():
    """record_metric(what, case, value_text): a measurement other than time, listed under the table."""
    def record(what, case, value):
        _METRICS.append((what, case, value))
    return record


@pytest.fixture
def peak_memory(request):
    """peak_memory(builder, *args, device) -> harness.PeakMemory: the peak memory of builder(*args)() in a fresh
    process with --bench-threads threads (see harness.peak_memory)."""
    threads = request.config.getoption("--bench-threads")

    def run(builder, *args, device, warmup=True) -> PeakMemory:
        return _peak_memory(builder, *args, device=str(device), threads=threads, warmup=warmup)

    return run


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
            f"({torch.get_num_threads()} threads, {os.cpu_count()} CPUs){gpu}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _CASES and not _METRICS:
        return
    lines = table(_CASES, _METRICS)
    terminalreporter.section("epamx: same-run ratios of interleaved timings")
    if _STATE["smoke"]:
        terminalreporter.write_line("benchmarks disabled: each implementation ran once, cold (no warm-up): "
                                    "a smoke run, not a measurement")
    terminalreporter.write_line(_environment())
    for line in lines:
        terminalreporter.write_line(line)
    path = config.getoption("--bench-table")
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write("# epamx benchmark results\n\n")
            if _STATE["smoke"]:
                f.write("**Benchmarks disabled: each implementation ran once, cold: a smoke run, not a "
                        "measurement.**\n\n")
            f.write(f"{_environment()}\n\n")
            f.write(method(torch.get_num_threads(), _STATE["affinity"]) + "\n\n")
            f.write("\n".join(lines) + "\n")
        terminalreporter.write_line(f"table written to {path}")
