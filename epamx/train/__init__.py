"""Training and evaluating EPAM-Net: config, loop, checkpoints, distributed set-up, metrics, plots.

    from epamx.train import load_config, run
    result = run(load_config("ntu60_xsub", ["data.ann_file=/data/ntu60_2d.pkl"]))

One file per concern: ``config`` (TOML -> frozen dataclasses), ``loop`` (train_one_epoch, evaluate, run_stage,
run), ``checkpoint`` (atomic, weights-only, resumable), ``distributed`` (torchrun's environment), ``metrics``,
``plots``.
"""
from epamx.train.config import Config, ConfigError, available_configs, load_config, to_toml
from epamx.train.loop import Evaluation, StageResult, evaluate, evaluate_checkpoint, load_model, run, run_stage

__all__ = ["Config", "ConfigError", "Evaluation", "StageResult", "available_configs", "evaluate",
           "evaluate_checkpoint", "load_config", "load_model", "run", "run_stage", "to_toml"]
