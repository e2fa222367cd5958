"""bench/harness.py, the benchmarks' timing: interleaving order, per-repeat ratios and their spread, the table's
noise marks, peak memory in a fresh process; and one small benchmark run end to end through pytest."""
import importlib.util
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_harness", REPO / "bench" / "harness.py")
harness = sys.modules["bench_harness"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(harness)


class _Clock:
    """A fake timer: each implementation advances it by its own cost, so the harness sees exact times."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def cost(self, name, seconds, log):
        def fn():
            log.append(name)
            self.now += seconds() if callable(seconds) else seconds
        return fn


def test_rounds_alternate_order_and_repeats_split():
    clock, log = _Clock(), []
    fns = {"a": clock.cost("a", 2.0, log), "b": clock.cost("b", 1.0, log), "c": clock.cost("c", 0.5, log)}
    timed = harness.Interleaved(fns, repeats=3, rounds=2, timer=clock)
    timed.run()
    assert log == ["a", "b", "c", "c", "b", "a"] * 3  # ABBA in every repeat
    samples = timed.samples
    assert [len(block) for block in samples["a"]] == [2, 2, 2]
    case = harness.Case("op", "cpu", "case", samples, baseline="a")
    assert case.seconds("b") == 1.0
    ratio = case.ratio("c", "a")
    assert ratio.per_repeat == (4.0, 4.0, 4.0) and not ratio.noise_limited


def test_cuda_blocks_time_several_calls_between_synchronisations():
    clock, log, syncs = _Clock(), [], []
    timed = harness.Interleaved({"a": clock.cost("a", 0.5, log)}, repeats=1, rounds=1, calls=4,
                                synchronize=lambda: syncs.append(len(log)), timer=clock)
    timed.run()
    assert log == ["a"] * 4 and syncs == [0, 4]
    assert timed.samples["a"] == [[0.5]]


def test_settle_sleeps_before_each_timed_call_and_is_not_timed():
    clock, log, sleeps = _Clock(), [], []

    def sleep(seconds):
        sleeps.append((seconds, len(log)))
        clock.now += seconds

    fns = {"a": clock.cost("a", 2.0, log), "b": clock.cost("b", 1.0, log)}
    timed = harness.Interleaved(fns, repeats=1, rounds=2, timer=clock, settle=0.25, sleep=sleep)
    timed.run()
    assert sleeps == [(0.25, 0), (0.25, 1), (0.25, 2), (0.25, 3)]
    assert timed.samples == {"a": [[2.0, 2.0]], "b": [[1.0, 1.0]]}


def test_ratio_spread_and_noise_limit():
    # b is twice as fast as a in repeat 0 and 3x in repeat 1: a spread of 1 on a median of 2.5 (40% > 25%)
    case = harness.Case("op", "cpu", "case", {"a": [[2.0, 2.0], [3.0, 3.0]], "b": [[1.0, 1.0], [1.0, 1.0]]},
                        baseline="a")
    ratio = case.ratio("b", "a")
    assert (ratio.median, ratio.low, ratio.high) == (2.5, 2.0, 3.0) and ratio.noise_limited
    steady = harness.Case("op", "cpu", "case", {"a": [[2.0], [2.2]], "b": [[1.0], [1.0]]}, baseline="a")
    assert not steady.ratio("b", "a").noise_limited
    single = harness.Case("op", "cpu", "case", {"a": [[2.0]], "b": [[1.0]]}, baseline="a")
    assert single.ratio("b", "a").noise_limited  # one repeat has no spread


def test_plan_rounds_fills_the_budget_in_whole_pairs():
    assert harness.plan_rounds(0.01, 1.0, repeats=5, min_rounds=2) == 20
    assert harness.plan_rounds(0.01, 0.9, repeats=5, min_rounds=2) == 18
    assert harness.plan_rounds(0.013, 1.0, repeats=5, min_rounds=2) == 16  # 16 rounded up to even stays 16
    assert harness.plan_rounds(0.07, 1.0, repeats=5, min_rounds=2) == 4  # 3 -> 4: whole ABBA pairs
    assert harness.plan_rounds(10.0, 1.0, repeats=5, min_rounds=2) == 2
    assert harness.plan_rounds(10.0, 1.0, repeats=5, min_rounds=1) == 1


def test_table_marks_baselines_noise_and_yardstick():
    case = harness.Case("shift", "cpu", "small float32 contiguous",
                        {"reference": [[4.0], [6.0]], "fused": [[1.0], [1.0]], "copy": [[1.0], [1.0]]},
                        baseline="reference", bytes_moved={"reference": 8e9, "fused": 8e9, "copy": 4e9},
                        yardstick="copy", extra_ratios=(("fused", "copy"),))
    lines = harness.table([case], [("peak memory", "small", "1 MiB")])
    assert lines[0].startswith("| op | device | case | impl | median time | vs baseline (median) | spread (min-max) |")
    rows = {line.split(" | ")[3]: line for line in lines[2:5]}
    assert "| baseline |" in rows["reference"]
    assert "| 5.00x * | 4.00-6.00x | 2x1 | 8.0 | 200% |" in rows["fused"]  # 8 GB/s against the copy's 4 GB/s
    assert "| fused vs copy | 1.00x | 1.00-1.00x |" in "\n".join(lines)
    assert lines[-1] == "| peak memory | small | 1 MiB |"
    assert "noise-limited" in harness.method(2, "not pinned")


def _allocate(megabytes):
    import torch

    def call():
        torch.ones(megabytes * 2**20, dtype=torch.uint8)
    return call


def test_peak_memory_in_a_fresh_process():
    if not pathlib.Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    peak = harness.peak_memory(_allocate, 256)
    assert 200 * 2**20 < peak.above_start < 400 * 2**20, peak


def test_bench_file_runs_through_the_harness(tmp_path):
    table = tmp_path / "table.md"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(REPO / "bench" / "bench_temporal_shift.py"), "-q", "-p",
         "no:cacheprovider", "-k", "cpu and fp32 and rgb_stage4 and contiguous", "--bench-time", "0.02",
         "--bench-repeats", "3", "--bench-warmup", "0", "--bench-table", str(table)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = table.read_text()
    assert "interleaved" in text and "ABBA" in text
    rows = [line for line in text.splitlines() if line.startswith("| temporal_shift |")]
    assert [row.split(" | ")[3] for row in rows] == ["reference", "fused", "fused_inplace", "copy"]
    assert all(" | 3x" in row for row in rows)  # 3 repeats
