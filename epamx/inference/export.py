"""A trained model out of Python: an ONNX file (ONNX Runtime, TensorRT, mobile runtimes) or a ``torch.export``
program (.pt2), each carrying its input contract.

    from epamx import inference
    inference.export_onnx("runs/embedded", "epamnet.onnx")     # dynamic batch, opset 18, standard operators only
    inference.export_program("runs/embedded", "epamnet.pt2")   # torch.export.load(...).module()(imgs, heatmaps)

Both trace the inference-ready model (batch norm folded, contiguous memory) once with ``torch.export``. The program
keeps the fused ops as ``torch.ops.epamx.*`` (they have fake kernels). For ONNX the program's epamx ops are then
decomposed into plain aten ops (:data:`DECOMPOSITIONS`), so the file holds only the standard ONNX domain and needs
neither epamx nor a custom-op library.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

import epamx
from epamx.config import Config
from epamx.data.batch_transform import IMAGENET_MEAN, IMAGENET_STD
from epamx.errors import CheckpointError, ConfigError
from epamx.inference.loading import LoadedModel, load
from epamx.models import optimize_for_inference
from epamx.models.streams import modalities
from epamx.ops import attention_reweight_reference, channel_pool_reference
from epamx.records import atomic_write_bytes

__all__ = ["DECOMPOSITIONS", "FORMATS", "MIN_OPSET", "DEFAULT_OPSET", "export", "export_onnx", "export_program",
           "input_contract", "read_contract"]

FORMATS = ("onnx", "pt2")
# torch's ONNX exporter translates aten ops for opset 18 and later; older opsets would go through ONNX's version
# converter, which does not convert every operator this model uses.
MIN_OPSET = 18
DEFAULT_OPSET = 18
_BATCH = "batch"
_CONTRACT_FILE = "epamx_contract.json"  # the contract inside a .pt2 archive (torch.export.save's extra_files)


def _temporal_shift_decomposition(input: Tensor, fold_div: int = 8, num_segments: Optional[int] = None) -> Tensor:
    """temporal_shift as slices, zero padding and a concatenation: the same values as ``temporal_shift_reference``,
    without its zeros_like + slice assignment, which traces into ScatterND nodes (or, traced at a fixed batch,
    into constant zero tensors of every activation's shape)."""
    x = input if input.dim() == 5 else input.unflatten(0, (-1, num_segments)).transpose(1, 2)
    fold = x.shape[1] // fold_div
    out = torch.cat((F.pad(x[:, :fold, 1:], (0, 0, 0, 0, 0, 1)),
                     F.pad(x[:, fold:2 * fold, :-1], (0, 0, 0, 0, 1, 0)),
                     x[:, 2 * fold:]), dim=1)
    return out if input.dim() == 5 else out.transpose(1, 2).flatten(0, 1)


# What each fused op an inference model runs becomes in an ONNX file.
DECOMPOSITIONS: Dict[Any, Callable[..., Tensor]] = {
    torch.ops.epamx.temporal_shift.default: _temporal_shift_decomposition,
    torch.ops.epamx.channel_pool.default: channel_pool_reference,
    torch.ops.epamx.attention_reweight.default: attention_reweight_reference,
}


# ---- the input contract --------------------------------------------------------------------------------------------

def _input_shapes(cfg: Config, mode: str) -> Dict[str, Tuple[int, ...]]:
    """Each input's shape after the batch dimension, as the config's pipeline makes them."""
    d = cfg.data
    shapes = {"imgs": (3, len(range(0, d.clip_len, d.rgb_every)), d.frame_size, d.frame_size),
              "heatmaps": (cfg.model.pose_channels, d.clip_len, d.heatmap_size, d.heatmap_size)}
    names = {"rgb": "imgs", "pose": "heatmaps"}
    return {names[m]: shapes[names[m]] for m in modalities(mode)}


def input_contract(loaded: LoadedModel, batch_size: Optional[int] = None) -> Dict[str, Any]:
    """What a runtime must feed an exported model and how to read its outputs: input names and shapes
    (``"batch"`` for a dynamic batch), how the inputs are made (the RGB normalisation, the heatmaps' size, sigma,
    eps and skeleton, the clip sampling), the output names, the class names, the mode and the epamx version."""
    cfg, d = loaded.config, loaded.config.data
    streams = modalities(loaded.mode)
    return {
        "epamx_version": epamx.__version__,
        "mode": loaded.mode,
        "inputs": [{"name": name, "shape": [batch_size or _BATCH, *shape], "dtype": "float32"}
                   for name, shape in _input_shapes(cfg, loaded.mode).items()],
        "outputs": [f"{stream}_logits" for stream in streams],
        "class_names": loaded.class_names,
        "rgb_normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                              "input": "RGB frames in 0..255, (x - mean) / std per channel"},
        "heatmaps": {"size": d.heatmap_size, "sigma": d.sigma, "eps": d.eps, "skeleton": d.skeleton,
                     "channels": cfg.model.pose_channels, "limbs": False},
        "sampling": {"clip_len": d.clip_len, "rgb_every": d.rgb_every, "frame_size": d.frame_size,
                     "max_persons": d.max_persons, "pipeline": cfg.stage(loaded.mode).pipeline},
    }


def read_contract(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The input contract stored in an exported .onnx or .pt2 file; CheckpointError if it holds none."""
    path = Path(path)
    if path.suffix == ".pt2":
        extra = {_CONTRACT_FILE: ""}
        torch.export.load(path, extra_files=extra)
        text = extra[_CONTRACT_FILE]
        if not text:
            raise CheckpointError(f"{path}: not a program exported by epamx (no {_CONTRACT_FILE} in it)")
        return json.loads(text)
    onnx = _require("onnx", "reading an ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from exc
    props = {p.key: p.value for p in model.metadata_props}
    if "epamx_version" not in props:
        raise CheckpointError(f"{path}: not an ONNX file exported by epamx (no 'epamx_version' in its metadata)")
    return {key: json.loads(value) for key, value in props.items()}


# ---- tracing -------------------------------------------------------------------------------------------------------

def _require(module: str, purpose: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{purpose} needs the {module} package: pip install 'epamx[export]'") from exc


def _trace(loaded: LoadedModel, batch_size: Optional[int]) -> torch.export.ExportedProgram:
    """``torch.export`` of the loaded model made ready for inference: fused ops, batch norm folded, contiguous
    memory, on the CPU; the batch dimension dynamic unless ``batch_size`` fixes it."""
    model = loaded.model.cpu()
    model.fused = True
    model = optimize_for_inference(model, "contiguous", cache_memory=False)
    shapes = _input_shapes(loaded.config, loaded.mode)
    # an example batch of 2: torch.export would specialise a dynamic dimension traced at size 1
    example = tuple(torch.randn(batch_size or 2, *shape) for shape in shapes.values())
    dynamic = None if batch_size else tuple({0: torch.export.Dim(_BATCH, min=1)} for _ in shapes)
    return torch.export.export(model, example, dynamic_shapes=dynamic, strict=False)


def _load(checkpoint: Union[str, os.PathLike, LoadedModel], config: Optional[str],
          overrides: Sequence[str]) -> LoadedModel:
    if isinstance(checkpoint, LoadedModel):
        return checkpoint
    return load(checkpoint, config, overrides, device="cpu")


def _check_batch_size(batch_size: Optional[int]) -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"export: batch_size must be an int >= 1 (or None: dynamic), got {batch_size!r}")


def export_program(checkpoint: Union[str, os.PathLike, LoadedModel], out: Union[str, os.PathLike], *,
                   batch_size: Optional[int] = None, config: Optional[str] = None,
                   overrides: Sequence[str] = ()) -> Path:
    """Write the ``torch.export`` program of a checkpoint or run folder's model (as :func:`epamx.inference.load`
    takes it) to ``out`` (.pt2) with its input contract (:func:`read_contract`), written atomically, and return ``out``.

    ``torch.export.load(out).module()`` takes the contract's inputs ((N, 3, T, H, W) imgs and/or
    (N, K, T_p, h, w) heatmaps) and returns the logits of each stream. The fused ops stay ``torch.ops.epamx.*``:
    loading needs epamx imported. ``batch_size`` fixes the batch (default: dynamic).
    """
    _check_batch_size(batch_size)
    loaded = _load(checkpoint, config, overrides)
    program = _trace(loaded, batch_size)
    contract = input_contract(loaded, batch_size)
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={_CONTRACT_FILE: json.dumps(contract)})
    return atomic_write_bytes(out, buffer.getvalue())


def _check_opset(opset: int) -> None:
    onnx = _require("onnx", "ONNX export")
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET:
        raise ConfigError(f"export: ONNX opset {opset!r} is too old; the minimum is {MIN_OPSET}")
    if opset > newest:
        raise ConfigError(f"export: ONNX opset {opset} is newer than the installed onnx {onnx.__version__} knows "
                          f"(at most {newest})")


def _finish_onnx(model, contract: Dict[str, Any], dynamic: bool) -> None:
    """Name the batch dimension, drop the per-node tracing records (stack traces with local paths: most of the
    graph's bytes), and store the contract in the model's metadata_props."""
    for node in model.graph.node:
        del node.metadata_props[:]
    batch_names = {v.type.tensor_type.shape.dim[0].dim_param for v in model.graph.input} if dynamic else set()
    batch_names.discard("")
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in batch_names:
                dim.dim_param = _BATCH
    del model.metadata_props[:]
    for key, value in contract.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)


def export_onnx(checkpoint: Union[str, os.PathLike, LoadedModel], out: Union[str, os.PathLike], *,
                opset: int = DEFAULT_OPSET, batch_size: Optional[int] = None, config: Optional[str] = None,
                overrides: Sequence[str] = ()) -> Path:
    """Write a checkpoint or run folder's model (as :func:`epamx.inference.load` takes it) to ``out`` as one ONNX
    file of standard operators (opset ``opset`` >= :data:`MIN_OPSET`), written atomically, and return ``out``.

    Inputs ``imgs`` (batch, 3, T, H, W) and/or ``heatmaps`` (batch, K, T_p, h, w), float32, as the training
    pipeline makes them; outputs ``rgb_logits`` and/or ``pose_logits`` (batch, classes): a one-stream checkpoint
    exports its stream alone. The weights are stored in the file (batch norm folded into the convolutions); the
    input contract (:func:`input_contract`) is in its metadata_props, each value JSON. ``batch_size`` fixes the
    batch (default: dynamic, named "batch"). Raises ConfigError for a bad opset or a missing onnx/onnxscript,
    CheckpointError for a checkpoint that is not epamx's.
    """
    _check_opset(opset)
    _check_batch_size(batch_size)
    _require("onnxscript", "ONNX export")
    onnx = _require("onnx", "ONNX export")
    loaded = _load(checkpoint, config, overrides)
    program = _trace(loaded, batch_size).run_decompositions(DECOMPOSITIONS)
    left = sorted({str(n.target) for n in program.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("epamx.")})
    if left:
        raise NotImplementedError(f"export_onnx: no decomposition for {', '.join(left)}")
    contract = input_contract(loaded, batch_size)
    onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=opset, verbose=False,
                                     input_names=[i["name"] for i in contract["inputs"]],
                                     output_names=contract["outputs"])
    model = onnx_program.model_proto
    _finish_onnx(model, contract, batch_size is None)
    onnx.checker.check_model(model)
    return atomic_write_bytes(out, model.SerializeToString())


def export(checkpoint: Union[str, os.PathLike, LoadedModel], out: Union[str, os.PathLike], format: str = "onnx", *,
           opset: Optional[int] = None, batch_size: Optional[int] = None, config: Optional[str] = None,
           overrides: Sequence[str] = ()) -> Path:
    """:func:`export_onnx` (``format="onnx"``) or :func:`export_program` (``"pt2"``); what ``epamx export``
    calls. ``opset`` applies to ONNX only (default :data:`DEFAULT_OPSET`)."""
    if format not in FORMATS:
        raise ConfigError(f"export: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if format == "pt2":
        if opset is not None:
            raise ConfigError(f"export: an opset ({opset}) applies to ONNX only, not to format 'pt2'")
        return export_program(checkpoint, out, batch_size=batch_size, config=config, overrides=overrides)
    return export_onnx(checkpoint, out, opset=DEFAULT_OPSET if opset is None else opset, batch_size=batch_size,
                       config=config, overrides=overrides)
