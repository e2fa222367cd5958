"""The authors' protocol: the pose stream alone, the RGB stream alone, then EPAM-Net initialised from both."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from epamx import distributed as D
from epamx.config import STAGES, Config, to_toml
from epamx.records import atomic_write_text, environment_info, write_json
from epamx.train.signals import StopFlag
from epamx.train.stage import StageResult, run_stage

__all__ = ["STAGES", "RunResult", "run"]


@dataclass
class RunResult:
    out_dir: Path
    stages: Dict[str, StageResult]
    stopped: bool = False


def run(cfg: Config, *, stop: Optional[StopFlag] = None,
        on_iteration: Optional[Callable[[str, Dict[str, Any]], None]] = None) -> RunResult:
    """Train ``cfg``: one stage for train.mode "pose", "rgb" or "epamnet"; for "all", the authors' protocol, each
    stage in its folder under train.out_dir, EPAM-Net initialised from both streams' final weights. Each stage
    prints its held-out result; a stopped stage ends the run (run it again to resume). ``on_iteration(stage,
    record)`` is called after every training iteration."""
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
        hook = None if on_iteration is None else (lambda record, mode=mode: on_iteration(mode, record))
        result = results[mode] = run_stage(cfg, mode, out_dir / mode, init, stop=stop, on_iteration=hook)
        if result.stopped:
            return RunResult(out_dir, results, stopped=True)
        if info.is_main:
            print(f"[{mode}] held-out {cfg.train.metric} ({result.primary}): {_result_text(result, cfg.train.metric)}",
                  flush=True)
    if info.is_main:
        _write_summary(cfg, out_dir, results)
    D.barrier()  # every rank leaves together (gloo can abort a rank whose peer has already torn down)
    return RunResult(out_dir, results)


def _result_text(result: StageResult, metric: str) -> str:
    """"88.54% (last epoch, 2); best 90.10% (epoch 1)": the last epoch is the headline, the best beside it."""
    text = f"{100 * result.headline(metric):.2f}% (last epoch, {result.epochs})"
    if result.best and result.best["epoch"] != result.epochs:
        text += f"; best {100 * result.best_value(metric):.2f}% (epoch {result.best['epoch']})"
    return text


def _write_summary(cfg: Config, out_dir: Path, results: Dict[str, StageResult]) -> None:
    metric = cfg.train.metric
    write_json(out_dir / "summary.json", {
        "out_dir": str(out_dir), "metric": metric,
        "stages": {m: {"final_checkpoint": str(r.final_checkpoint), "primary": r.primary, "epoch": r.epochs,
                       "metrics": r.metrics, "best_epoch": r.best}
                   for m, r in results.items()}})
    lines = [f"Done. Everything is in {out_dir}/:"]
    for m, r in results.items():
        lines.append(f"  {m:<7} {metric} {_result_text(r, metric)}  {r.out_dir}/ (final.pt, log.jsonl, "
                     f"curves.png, confusion.png, per_class.txt)")
    lines.append("  summary.json, config.toml, environment.json")
    print("\n".join(lines), flush=True)
