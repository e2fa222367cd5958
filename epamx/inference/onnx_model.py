"""An exported ONNX file run with ONNX Runtime in place of the checkpoint it came from (``epamx predict --onnx``).

    exported = inference.load_onnx("epamnet.onnx", config="runs/embedded/config.toml")
    clips = inference.clips(exported.config, exported.class_names, exported.mode, samples=["val_00002_clap"])
    print(inference.predict(exported, exported.config, clips))
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from epamx.config import Config
from epamx.errors import CheckpointNotFound
from epamx.inference.export import _require, read_contract
from epamx.inference.loading import config_for_checkpoint

__all__ = ["OnnxModel", "load_onnx"]


@dataclass
class OnnxModel:
    """An ONNX Runtime session of an epamx export, its contract (:func:`epamx.inference.read_contract`), and the
    config whose pipeline makes its inputs (the contract's sampling and heatmap values override the config's)."""
    path: Path
    session: Any
    contract: Dict[str, Any]
    config: Config
    device: torch.device = torch.device("cpu")

    @property
    def mode(self) -> str:
        return self.contract["mode"]

    @property
    def class_names(self) -> List[str]:
        return list(self.contract["class_names"])

    def stream_logits(self, imgs: Optional[Tensor], heatmaps: Optional[Tensor]) -> Dict[str, Tensor]:
        """Like :func:`epamx.models.streams.stream_logits`: {'rgb': (N, C)}, {'pose': (N, C)} or both."""
        given = {"imgs": imgs, "heatmaps": heatmaps}
        feed = {i["name"]: np.ascontiguousarray(given[i["name"]].detach().cpu().float().numpy())
                for i in self.contract["inputs"]}
        outputs = self.session.run(self.contract["outputs"], feed)
        return {name.removesuffix("_logits"): torch.from_numpy(value)
                for name, value in zip(self.contract["outputs"], outputs)}


def _pipeline_overrides(contract: Dict[str, Any]) -> List[str]:
    """The config values the model was exported with, as overrides, so its clips are made as in training."""
    sampling, heatmaps = contract["sampling"], contract["heatmaps"]
    return [f"data.clip_len={sampling['clip_len']}", f"data.rgb_every={sampling['rgb_every']}",
            f"data.frame_size={sampling['frame_size']}", f"data.max_persons={sampling['max_persons']}",
            f"data.heatmap_size={heatmaps['size']}", f"data.sigma={heatmaps['sigma']}", f"data.eps={heatmaps['eps']}",
            f"data.skeleton={json.dumps(heatmaps['skeleton'])}", f"model.pose_channels={heatmaps['channels']}"]


def load_onnx(path: Union[str, os.PathLike], config: Optional[str] = None,
              overrides: Sequence[str] = ()) -> OnnxModel:
    """An ONNX file written by :func:`epamx.inference.export_onnx`, ready to run on the CPU with ONNX Runtime.

    ``config`` (a name or TOML file; default: a run's config.toml beside or above the file, else "embedded") and
    ``overrides`` say where the data is; the input pipeline's values come from the file's contract. Raises
    CheckpointNotFound / CheckpointError for a missing file or one epamx did not export, ConfigError without
    onnxruntime.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFound(f"ONNX file {path} does not exist")
    ort = _require("onnxruntime", "running an ONNX file")
    contract = read_contract(path)
    cfg = config_for_checkpoint(path, config, list(overrides) + _pipeline_overrides(contract))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return OnnxModel(path, session, contract, cfg)
