"""Interleaved timing, same-run ratios and peak memory for the benchmarks (bench/conftest.py wraps them as fixtures).

A case is one op at one size, dtype, memory format and thread count, with several implementations (reference,
fused, a copy of the same bytes ...). They are timed interleaved, so that whatever else the machine does slows
them alike and their ratio holds where their absolute times do not:

    warm-up rounds, then `repeats` blocks of `rounds` rounds; a round calls every implementation once, in the
    listed order on even rounds and in reverse on odd ones (A B C, C B A: ABBA order).

Per repeat, each implementation's median time and its ratio to the baseline's; a ratio is reported as the median
over the repeats with its spread (min-max over the repeats), a time as the median of all its rounds.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Iterable, Mapping, Optional, Sequence

NOISE_LIMIT = 0.25  # a ratio whose spread is wider than this fraction of its median is marked noise-limited


@dataclasses.dataclass(frozen=True)
class Ratio:
    """How many times faster `impl` is than `over`: per repeat, over's median time / impl's median time."""
    impl: str
    over: str
    per_repeat: tuple

    @property
    def median(self) -> float:
        return statistics.median(self.per_repeat)

    @property
    def low(self) -> float:
        return min(self.per_repeat)

    @property
    def high(self) -> float:
        return max(self.per_repeat)

    @property
    def noise_limited(self) -> bool:
        """Spread (max - min) wider than NOISE_LIMIT x the median, or too few repeats to have a spread."""
        return len(self.per_repeat) < 2 or self.high - self.low > NOISE_LIMIT * self.median


@dataclasses.dataclass
class Case:
    """One case's timings: samples[impl][repeat] lists the seconds per call of each round."""
    op: str
    device: str
    case: str
    samples: dict
    baseline: Optional[str] = None
    bytes_moved: dict = dataclasses.field(default_factory=dict)
    yardstick: Optional[str] = None
    extra_ratios: tuple = ()
    calls: int = 1  # calls per timed block

    @property
    def impls(self) -> list:
        return list(self.samples)

    @property
    def repeats(self) -> int:
        return len(next(iter(self.samples.values())))

    @property
    def rounds(self) -> int:
        return len(next(iter(self.samples.values()))[0])

    def seconds(self, impl: str) -> float:
        """Median seconds per call over all rounds."""
        return statistics.median(t for block in self.samples[impl] for t in block)

    def _repeat_medians(self, impl: str) -> list:
        return [statistics.median(block) for block in self.samples[impl]]

    def ratio(self, impl: str, over: str) -> Ratio:
        """impl's speed-up over `over`, measured repeat by repeat."""
        return Ratio(impl, over, tuple(o / i for i, o in zip(self._repeat_medians(impl), self._repeat_medians(over))))

    def bandwidth(self, impl: str) -> Optional[float]:
        """Bytes the implementation must move / its median time, in bytes per second (None: bytes not given)."""
        nbytes = self.bytes_moved.get(impl, 0)
        return nbytes / self.seconds(impl) if nbytes else None

    def vs_yardstick(self, impl: str) -> Optional[Ratio]:
        """Bandwidth / the yardstick's bandwidth (a copy of the same bytes), repeat by repeat."""
        if not self.yardstick or impl == self.yardstick or not self.bytes_moved.get(impl):
            return None
        scale = self.bytes_moved[impl] / self.bytes_moved[self.yardstick]
        return Ratio(impl, self.yardstick, tuple(r * scale for r in self.ratio(impl, self.yardstick).per_repeat))


class Interleaved:
    """Runs `repeats` x `rounds` interleaved rounds, one per call of round(), and keeps each call's time.

    A round calls every implementation once: in the given order on even rounds of a repeat, in reverse on odd
    ones. Garbage is collected before each repeat, not during one (gc stays off while the rounds run). On CUDA
    (`synchronize` given) a timed block is `calls` calls between two synchronisations, so neither launch latency
    nor the synchronisation itself counts as kernel time; the time kept is the block's / calls. `settle`: seconds
    of sleep (untimed) before each timed block, so that a runtime whose idle threads spin after a call (ONNX
    Runtime's intra-op pool does, for tens of ms) does not take the CPUs from the implementation timed next."""

    def __init__(self, fns: Mapping[str, Callable], repeats: int, rounds: int, calls: int = 1,
                 synchronize: Optional[Callable] = None, timer: Callable[[], float] = time.perf_counter,
                 settle: float = 0.0, sleep: Callable[[float], None] = time.sleep):
        self.fns = dict(fns)
        self.settle, self.sleep = settle, sleep
        self.repeats, self.rounds, self.calls = repeats, rounds, calls
        self.synchronize = synchronize or (lambda: None)
        self.timer = timer
        self.done = 0
        self._samples: dict = {name: [[] for _ in range(repeats)] for name in self.fns}

    @property
    def total(self) -> int:
        return self.repeats * self.rounds

    def round(self) -> None:
        repeat, index = divmod(self.done, self.rounds)
        if index == 0:
            gc.collect()
        order = list(self.fns) if index % 2 == 0 else list(reversed(self.fns))
        for name in order:
            fn = self.fns[name]
            if self.settle > 0:
                self.sleep(self.settle)
            self.synchronize()
            start = self.timer()
            for _ in range(self.calls):
                fn()
            self.synchronize()
            self._samples[name][repeat].append((self.timer() - start) / self.calls)
        self.done += 1

    def run(self, rounds: Optional[int] = None) -> None:
        """Run the remaining rounds (or the next `rounds`) with garbage collection off."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            for _ in range(self.total - self.done if rounds is None else rounds):
                self.round()
        finally:
            if enabled:
                gc.enable()

    @property
    def samples(self) -> dict:
        """samples[impl][repeat] = [seconds per call, one per round], for the repeats begun so far."""
        return {name: [block for block in blocks if block] for name, blocks in self._samples.items()}


def warm_up(fns: Mapping[str, Callable], seconds: float, calls: int = 1, synchronize: Optional[Callable] = None,
            timer: Callable[[], float] = time.perf_counter, settle: float = 0.0) -> float:
    """Interleaved rounds until `seconds` have passed, at least two (a first call may pay one-time costs, such as
    allocations and lazy initialisation); returns the last round's seconds, which plans the timed rounds."""
    warm = Interleaved(fns, 1, 1_000_000, calls, synchronize, timer, settle)
    start = timer()
    while True:
        round_start = timer()
        warm.round()
        round_seconds = timer() - round_start
        if warm.done >= 2 and timer() - start >= seconds:
            return round_seconds


def plan_rounds(round_seconds: float, budget_seconds: float, repeats: int, min_rounds: int,
                max_rounds: int = 1000) -> int:
    """Rounds per repeat: enough to fill the budget, at least min_rounds, even when above 1 (whole ABBA pairs)."""
    wanted = math.ceil(budget_seconds / max(round_seconds, 1e-9) / repeats)
    rounds = max(min_rounds, min(wanted, max_rounds))
    return rounds + rounds % 2 if rounds > 1 else rounds


def time_interleaved(fns: Mapping[str, Callable], *, repeats: int = 5, min_rounds: int = 2,
                     seconds_per_impl: float = 1.0, warmup_seconds: float = 0.2, calls: int = 1,
                     synchronize: Optional[Callable] = None,
                     timer: Callable[[], float] = time.perf_counter) -> Interleaved:
    """Warm up, plan the rounds per repeat so that the timed rounds take about seconds_per_impl x implementations,
    and run them. The result's samples hold the times."""
    round_seconds = warm_up(fns, warmup_seconds, calls, synchronize, timer)
    rounds = plan_rounds(round_seconds, seconds_per_impl * len(fns), repeats, min_rounds)
    timed = Interleaved(fns, repeats, rounds, calls, synchronize, timer)
    timed.run()
    return timed


def _time_text(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.3f} s"


def _ratio_text(ratio: Ratio) -> tuple:
    mark = " *" if ratio.noise_limited else ""
    spread = f"{ratio.low:.2f}-{ratio.high:.2f}x" if len(ratio.per_repeat) > 1 else "n/a"
    return f"{ratio.median:.2f}x{mark}", spread


def table(cases: Iterable[Case], metrics: Sequence = ()) -> list:
    """The results as markdown lines: one row per implementation, then the extra ratios and the measurements."""
    cases = list(cases)
    lines = ["| op | device | case | impl | median time | vs baseline (median) | spread (min-max) | rounds | GB/s "
             "| vs copy |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        for impl in c.impls:
            ratio, spread = "", ""
            if c.baseline == impl:
                ratio = "baseline"
            elif c.baseline:
                ratio, spread = _ratio_text(c.ratio(impl, c.baseline))
            bandwidth = c.bandwidth(impl)
            versus = c.vs_yardstick(impl)
            gbs = f"{bandwidth / 1e9:.1f}" if bandwidth else ""
            vs_copy = f"{versus.median:.0%}" if versus else ""
            lines.append(f"| {c.op} | {c.device} | {c.case} | {impl} | {_time_text(c.seconds(impl))} | {ratio} "
                         f"| {spread} | {c.repeats}x{c.rounds} | {gbs} | {vs_copy} |")
    extra = [(c, c.ratio(a, b)) for c in cases for a, b in c.extra_ratios]
    if extra:
        lines += ["", "| op | device | case | ratio | median | spread (min-max) |", "|---|---|---|---|---:|---:|"]
        for c, r in extra:
            median, spread = _ratio_text(r)
            lines.append(f"| {c.op} | {c.device} | {c.case} | {r.impl} vs {r.over} | {median} | {spread} |")
    if metrics:
        lines += ["", "| measurement | case | value |", "|---|---|---|"]
        lines += [f"| {what} | {case} | {value} |" for what, case, value in metrics]
    return lines


def method(threads: int, affinity: str) -> str:
    """The paragraph that heads a results file: how the numbers were taken and how to read them."""
    return (
        "Each case (one op, size, dtype, memory format) times its implementations interleaved in one process: "
        "warm-up rounds, then repeats (blocks) of rounds, a round calling every implementation once in ABBA order "
        "(A B C, then C B A). `median time`: the median of an implementation's rounds. `vs baseline`: per repeat, "
        "the baseline's median time / this one's, then the median over the repeats; `spread`: the lowest and "
        "highest of those per-repeat ratios. A ratio marked `*` is noise-limited: its spread is wider than "
        f"{NOISE_LIMIT:.0%} of its median (or it has a single repeat). `rounds`: repeats x rounds per repeat. "
        "Both sides of a ratio use the same inputs, dtype, memory format and threads. `GB/s`: the bytes the op "
        "must read and write / median time. `vs copy`: that bandwidth / the yardstick's (a copy of the same bytes "
        "into a buffer that already exists; for render_heatmaps a fill of the output), per repeat, median. "
        "Out-of-place ops allocate their output each call; in-place rows re-process the same tensor every round, "
        "so on a CPU whose last-level cache holds it they run from cache. On CUDA a timed block is several calls "
        "between two synchronisations. "
        f"Threads: torch.set_num_threads({threads}) and set_num_interop_threads({threads}); CPU affinity: "
        f"{affinity}. Extra ratios (second table) are taken the same way between two implementations of a case."
    )


# Run in a fresh interpreter: imports the target's file, builds the call, runs it once to warm up, then measures a
# second call. Linux resets the resident high-water mark (VmHWM) on writing 5 to /proc/self/clear_refs, so the
# imports' and the warm-up's own peaks do not hide the measured call's.
_PEAK_MEMORY_SCRIPT = r"""
import importlib.util, json, os, sys
import torch

def status():
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(("VmHWM", "VmRSS"))}

path, name, args, device, threads, warmup = json.loads(sys.argv[1])
torch.set_num_threads(threads)
sys.path.insert(0, os.path.dirname(path))
spec = importlib.util.spec_from_file_location("_peak_memory_target", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
call = getattr(module, name)(*args)
if warmup:
    call()
if device.startswith("cuda"):
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
else:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status()["VmRSS"]
    call()
    peak = status()["VmHWM"]
print(json.dumps({"before": before, "peak": peak}))
"""


@dataclasses.dataclass(frozen=True)
class PeakMemory:
    """Bytes in use before the measured call and at its peak: resident memory (CPU) or torch's allocations (CUDA)."""
    before: int
    peak: int

    @property
    def above_start(self) -> int:
        return self.peak - self.before


def peak_memory(builder: Callable, *args, device: str = "cpu", threads: int = 2, warmup: bool = True,
                timeout: float = 1800) -> PeakMemory:
    """Peak memory of one call of builder(*args)() in a fresh Python process.

    builder is a module-level function of a bench file (the child imports that file by its path), args are
    JSON-serialisable; builder sets up (model, inputs) and returns the call to measure. The call runs once to
    warm up (warmup=True), then again measured. On a CPU: the process's peak resident memory during that call,
    Linux only (/proc/self/status VmHWM after resetting it through /proc/self/clear_refs); on CUDA:
    torch.cuda.max_memory_allocated, so cached but unused blocks do not count."""
    path = os.path.abspath(builder.__code__.co_filename)
    env = dict(os.environ)
    epamx = sys.modules.get("epamx")
    if epamx is not None:  # the child imports the same epamx as this process
        root = os.path.dirname(os.path.dirname(os.path.abspath(epamx.__file__)))
        env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    payload = json.dumps([path, builder.__name__, list(args), str(device), threads, warmup])
    out = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_SCRIPT, payload], capture_output=True, text=True,
                         env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"peak_memory({builder.__name__}{tuple(args)}) failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return PeakMemory(result["before"], result["peak"])
