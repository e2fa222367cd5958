"""Is `epamx train` robust, not lucky? Train a config (the main command's, embedded, by default) with several
training seeds, each in a fresh scratch folder, one after the other, and print a table: per seed the held-out
top-1 of the pose stream, the RGB stream and EPAM-Net (summed scores), EPAM-Net's margin over the better single
stream, the wall time and the CPU time (user + system, DataLoader workers included), then the mean and the
minimum of every column and the CPU's name. Exits 1 if a seed misses a goal (--min-epamnet, --min-margin), 2 if a
run fails.

    python tools/seed_check.py                                   # seeds 0, 1, 2 of the shipped embedded config
    python tools/seed_check.py --seeds 0 1 2 3 4 stages.rgb.epochs=10 stages.rgb.lr_per_16=0.1   # with overrides
    python tools/seed_check.py data.embedded.seed=1              # another dataset (generated first, and timed)
    python tools/seed_check.py --per-class train.mode=pose       # one stage; list each seed's imperfect classes

The dataset is built (or found in the cache) before the first seed, so the seeds' times exclude generating it;
the table says how long that took. Too slow for the test suite (minutes per seed on a 2-core CPU): run by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

# The checkout this tool belongs to: its epamx is the one checked, here and in the training processes (an
# editable install elsewhere, or another worktree's, would otherwise be imported).
REPO = Path(__file__).resolve().parents[1]
PATH = [str(REPO)] if (REPO / "epamx" / "__init__.py").exists() else []
sys.path[:0] = PATH

STAGES = ("pose", "rgb", "epamnet")
HEADERS = {"pose": "pose", "rgb": "RGB", "epamnet": "EPAM-Net"}


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return f"{name}, {cores} cores"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def build_dataset(config: str, overrides: List[str]) -> Optional[str]:
    """Generate the config's embedded dataset unless it is cached; return a line saying which, and the time."""
    from epamx.config import load_config
    from epamx.data import build_embedded
    from epamx.data.embedded import embedded_dir

    cfg = load_config(config, overrides)
    if cfg.data.dataset != "embedded":
        return None
    root = embedded_dir(cfg.data)
    if (root / "embedded.pkl").exists():
        return f"dataset: cached ({root})"
    wall, cpu = time.perf_counter(), time.process_time() + _children_cpu()
    build_embedded(cfg.data, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() + _children_cpu() - cpu
    return f"dataset: generated in {wall:.1f} s wall, {cpu:.1f} s CPU ({root})"


def train(config: str, overrides: List[str], seed: int, out_dir: Path, log: Path) -> Dict[str, object]:
    """One `python -m epamx train` in ``out_dir``; its results, wall and CPU seconds."""
    command = [sys.executable, "-m", "epamx", "train", "--config", config, *overrides, f"train.seed={seed}",
               f"train.out_dir={out_dir}", "train.progress=false"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(PATH + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cpu, wall = _children_cpu(), time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    wall, cpu = time.perf_counter() - wall, _children_cpu() - cpu
    result: Dict[str, object] = {"seed": seed, "rc": rc, "wall_s": wall, "cpu_s": cpu, "out_dir": str(out_dir)}
    summary = out_dir / "summary.json"
    if rc == 0 and summary.exists():
        stages = json.loads(summary.read_text())["stages"]
        for mode, stage in stages.items():
            result[mode] = 100 * stage["metrics"][stage["primary"]]["top1"]
        singles = [result[m] for m in ("pose", "rgb") if m in result]
        if "epamnet" in result and singles:
            result["margin"] = result["epamnet"] - max(singles)
    return result


def imperfect_classes(stage_dir: Path) -> List[str]:
    """'class accuracy% (most confused with)' for every class below 100% in a stage's per_class.txt."""
    path = stage_dir / "per_class.txt"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        m = re.match(r"^\d+ (\S+)\s+\d+\s+\d+\s+([\d.]+)%\s+(.*)$", line)
        if m and float(m.group(2)) < 100:
            rows.append(f"{m.group(1)} {float(m.group(2)):.0f}% ({m.group(3).strip()})")
    return rows


def _fmt(value: Optional[float], unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{int(value // 60)} min {value % 60:04.1f} s" if value >= 60 else f"{value:.1f} s"
    return f"{value:.2f}"


def table(results: List[Dict[str, object]]) -> str:
    columns = [(m, HEADERS[m], "") for m in STAGES] + [("margin", "margin", ""), ("wall_s", "wall", "s"),
                                                         ("cpu_s", "CPU", "s")]
    columns = [c for c in columns if any(c[0] in r for r in results)]
    lines = ["| seed | " + " | ".join(h for _, h, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in results:
        lines.append(f"| {r['seed']} | " + " | ".join(_fmt(r.get(k), u) for k, _, u in columns) + " |")
    for name, reduce in (("mean", statistics.fmean), ("min", min)):
        cells = []
        for key, _, unit in columns:
            values = [r[key] for r in results if key in r]
            cells.append(_fmt(reduce(values) if values else None, unit))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (as `epamx train` takes them)")
    parser.add_argument("--config", default="embedded", help="a shipped config's name or a TOML file")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed values (0 1 2)")
    parser.add_argument("--out", help="scratch folder for the runs (default: a new temporary folder); each seed "
                                      "trains in <out>/seed<N>, which must not exist yet")
    parser.add_argument("--min-epamnet", type=float, default=95.0,
                        help="goal: EPAM-Net's held-out top-1 of every seed, percent (95)")
    parser.add_argument("--min-margin", type=float, default=10.0,
                        help="goal: EPAM-Net's lead over the better single stream for every seed, points (10)")
    parser.add_argument("--per-class", action="store_true", help="list each seed's imperfect classes per stage")
    parser.add_argument("--clean", action="store_true", help="delete the run folders at the end")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if any(o.split("=", 1)[0] in ("train.seed", "train.out_dir") for o in args.overrides):
        parser.error("train.seed and train.out_dir are set per run: use --seeds and --out")

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="epamx-seed-check-"))
    out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        if (out / f"seed{seed}").exists():
            parser.error(f"{out / f'seed{seed}'} exists: a finished run there would be reused, not timed")
    import epamx

    print(f"seed_check: {args.config} {' '.join(args.overrides)}".rstrip() + f", seeds {args.seeds}, in {out} "
          f"(epamx from {Path(epamx.__file__).parent})", flush=True)
    dataset = build_dataset(args.config, args.overrides)
    if dataset:
        print(dataset, flush=True)
    results = []
    for seed in args.seeds:
        result = train(args.config, args.overrides, seed, out / f"seed{seed}", out / f"seed{seed}.log")
        results.append(result)
        scores = ", ".join(f"{HEADERS[m]} {result[m]:.2f}" for m in STAGES if m in result)
        status = scores if result["rc"] == 0 else f"FAILED (exit {result['rc']}, see {out / f'seed{seed}.log'})"
        print(f"seed {seed}: {status} in {_fmt(result['wall_s'], 's')} ({_fmt(result['cpu_s'], 's')} CPU)",
              flush=True)
        if args.per_class and result["rc"] == 0:
            for mode in STAGES:
                rows = imperfect_classes(out / f"seed{seed}" / mode)
                if mode in result:
                    print(f"  {mode:<8}{'; '.join(rows) or 'every class 100%'}", flush=True)

    print()
    print(table(results))
    print(f"\nCPU: {cpu_name()}; {dataset or 'dataset: not embedded'}")
    failed = [r["seed"] for r in results if r["rc"] != 0]
    missed = []
    for r in results:
        if r["rc"] != 0 or "epamnet" not in r:
            continue
        if r["epamnet"] < args.min_epamnet:
            missed.append(f"seed {r['seed']}: EPAM-Net {r['epamnet']:.2f}% < {args.min_epamnet}%")
        if "margin" in r and r["margin"] < args.min_margin:
            missed.append(f"seed {r['seed']}: margin {r['margin']:.2f} < {args.min_margin} points")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "overrides": args.overrides, "cpu": cpu_name(),
                                               "dataset": dataset, "results": results}, indent=2) + "\n")
    if args.clean:
        shutil.rmtree(out, ignore_errors=True)
    else:
        print(f"runs (per_class.txt, log.jsonl per stage): {out}")
    if failed:
        print(f"FAILED runs: seeds {failed}", file=sys.stderr)
        return 2
    if missed:
        print("goal missed: " + "; ".join(missed), file=sys.stderr)
        return 1
    print(f"goals met: EPAM-Net >= {args.min_epamnet}% and >= {args.min_margin} points above the better stream "
          f"for every seed" if any("epamnet" in r for r in results) else "no EPAM-Net stage: no goal checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
