"""Training EPAM-Net as the authors do: each stream alone, then EPAM-Net from both.

    from epamx.config import load_config
    from epamx.train import run
    result = run(load_config("ntu60_xsub", ["data.ann_file=/data/ntu60_2d.pkl"]))

One module per concern: ``epoch`` (train_one_epoch, the cosine schedule), ``stage`` (one stage as named steps),
``protocol`` (the three stages), ``checkpoint`` (resumable training state), ``stage_log`` (JSON log and
TensorBoard), ``signals`` (stopping cleanly). Evaluation is epamx.inference's; the config is epamx.config.
"""
from epamx.train.epoch import EpochResult, cosine_schedule, train_one_epoch
from epamx.train.protocol import STAGES, RunResult, run
from epamx.train.signals import StopFlag, stop_on_signals
from epamx.train.stage import StageResult, run_stage

__all__ = ["STAGES", "EpochResult", "RunResult", "StageResult", "StopFlag", "cosine_schedule", "run", "run_stage",
           "stop_on_signals", "train_one_epoch"]
