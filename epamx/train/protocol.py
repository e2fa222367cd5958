"""The authors' protocol: the pose stream alone, the RGB stream alone, then EPAM-Net initialised from both."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from epamx import distributed as D
from epamx.config import Config, to_toml
from epamx.records import atomic_write_text, environment_info, write_json
from epamx.train.signals import StopFlag
from epamx.train.stage import StageResult, run_stage

__all__ = ["STAGES", "RunResult", "run"]

STAGES = ("pose", "rgb", "epamnet")


@dataclass
class RunResult:
    out_dir: Path
    stages: Dict[str, StageResult]
    stopped: bool = False


def run(cfg: Config, *, stop: Optional[StopFlag] = None) -> RunResult:
    """Train ``cfg``: one stage for train.mode "pose", "rgb" or "epamnet"; for "all", the authors' protocol, each
    stage in its folder under train.out_dir, EPAM-Net initialised from both streams' final weights. Each stage
    prints its held-out result; a stopped stage ends the run (run it again to resume)."""
    info = D.init_distributed(cfg.train.device)
    out_dir = Path(cfg.train.out_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.toml", to_toml(cfg))
        write_json(out_dir / "environment.json", environment_info(info.world_size))
    stop = stop if stop is not None else StopFlag()
    results: Dict[str, StageResult] = {}
    for mode in STAGES if cfg.train.mode == "all" else (cfg.train.mode,):
        if cfg.train.mode == "all" and mode == "epamnet":
            init = [results["pose"].final_checkpoint, results["rgb"].final_checkpoint]
        else:
            init = list(cfg.train.init_from)
        result = results[mode] = run_stage(cfg, mode, out_dir / mode, init, stop=stop)
        if result.stopped:
            return RunResult(out_dir, results, stopped=True)
        if info.is_main:
            print(f"[{mode}] held-out {cfg.train.metric} ({result.primary}): "
                  f"{100 * result.headline(cfg.train.metric):.2f}%", flush=True)
    if info.is_main:
        _write_summary(cfg, out_dir, results)
    D.barrier()  # every rank leaves together (gloo can abort a rank whose peer has already torn down)
    return RunResult(out_dir, results)


def _write_summary(cfg: Config, out_dir: Path, results: Dict[str, StageResult]) -> None:
    metric = cfg.train.metric
    write_json(out_dir / "summary.json", {
        "out_dir": str(out_dir), "metric": metric,
        "stages": {m: {"final_checkpoint": str(r.final_checkpoint), "primary": r.primary, "metrics": r.metrics}
                   for m, r in results.items()}})
    lines = [f"Done. Everything is in {out_dir}/:"]
    for m, r in results.items():
        lines.append(f"  {m:<7} {metric} {100 * r.headline(metric):6.2f}%  {r.out_dir}/ (final.pt, log.jsonl, "
                     f"curves.png, confusion.png, per_class.txt)")
    lines.append("  summary.json, config.toml, environment.json")
    print("\n".join(lines), flush=True)
