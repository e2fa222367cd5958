"""A training run's whole configuration: frozen dataclasses, one per TOML table, loaded strictly.

    [data]            epamx.data.DataConfig      what to read and how (with [data.embedded])
    [model]           ModelConfig                the network
    [optim]           OptimConfig                SGD, the learning-rate schedule, gradient clipping
    [train]           TrainConfig                the protocol, batch, devices, checkpoints, output folder
    [stages.pose]     StageConfig                one stage's own recipe (pipeline, epochs, batch, optimiser, amp);
    [stages.rgb]                                 what it leaves out it takes from [train] and [optim]
    [stages.epamnet]

``config.stage("pose")`` is a stage's resolved recipe (StageSettings).

``load_config("ntu60_xsub")`` reads a config shipped in ``epamx/configs/``, ``load_config("my.toml")`` a file;
``overrides`` are ``section.key=value`` strings from the command line (the value a TOML literal, or a bare string),
applied before validation. Unknown keys are errors naming the key, its table, the file and the closest valid
key; values are type-checked. ``to_toml`` writes the resolved config back, which every run records.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import os
import tomllib
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from epamx.data.config import DataConfig, EmbeddedConfig
from epamx.errors import ConfigError

__all__ = ["Config", "ConfigError", "DataConfig", "EmbeddedConfig", "ModelConfig", "OptimConfig", "StageConfig",
           "StageSettings", "StagesConfig", "STAGES", "TrainConfig", "available_configs", "config_from_dict", "load_config",
           "override", "parse_override", "to_toml"]


@dataclass(frozen=True)
class ModelConfig:
    """EPAM-Net and its streams (epamx.models)."""
    num_classes: int = 0             # 0: take the dataset's class count; otherwise it must match the dataset
    pose_channels: int = 17          # heatmap channels (17 COCO joints; more with limbs)
    fused: bool = True               # the fused epamx ops, or False for the plain-PyTorch reference path
    dropout: float = 0.5             # of both classification heads
    channels_last: Union[bool, str] = "auto"  # channels_last_3d model and inputs; "auto": on for CPU, off for CUDA
    sync_bn: bool = True             # SyncBatchNorm across processes (CUDA only; the authors' setting)
    inference_dtype: str = "float32"  # eval/predict: "float32", or "bfloat16" (fast on CPUs with avx512_bf16/AMX)


@dataclass(frozen=True)
class OptimConfig:
    """SGD with a per-iteration cosine schedule (the authors': lr 0.001 per 16 clips of total batch)."""
    lr_per_16: float = 0.001         # lr = lr_per_16 * batch_size * world_size / 16
    momentum: float = 0.9
    weight_decay: float = 3e-4
    nesterov: bool = False
    warmup_iters: int = 0            # linear warm-up from 0, within the cosine's iterations
    clip_grad: float = 40.0          # max L2 norm of all gradients; 0 disables clipping
    min_lr: float = 0.0              # the cosine's floor


@dataclass(frozen=True)
class TrainConfig:
    """The protocol and the run's mechanics."""
    mode: str = "all"                # "rgb", "pose" or "epamnet" alone; "all": pose, rgb, then EPAM-Net from both
    epochs: int = 10                 # per stage (unless [stages.<stage>] says otherwise)
    batch_size: int = 12             # per process (the authors: 12 per GPU)
    workers: int = 4                 # DataLoader worker processes per training process
    seed: int = 0
    device: str = "auto"             # "auto" (cuda:LOCAL_RANK when there is a GPU, else cpu), "cpu", "cuda", "cuda:1"
    amp: str = "auto"                # "auto" (bf16 on CUDA where supported, else off), "bf16", "fp16", "off"
    eval_every_epochs: int = 1       # 0: only after the last epoch
    checkpoint_every_iters: int = 500  # plus one after every epoch; 0: only after epochs
    keep_checkpoints: int = 2        # iteration checkpoints kept (the newest); epoch checkpoints are all kept
    metric: str = "top1"             # the headline metric: "top1", "top5" or "mean_class_accuracy" (Toyota)
    out_dir: str = ""                # "" -> runs/<config name>
    init_from: List[str] = field(default_factory=list)  # checkpoints the (first) stages start from
    resume: bool = True              # continue from out_dir's latest checkpoints when there are any
    deterministic: bool = False      # torch.use_deterministic_algorithms, no cuDNN autotuning
    progress: bool = True            # a tqdm progress bar (rank 0)
    tensorboard: bool = False        # also log to <stage folder>/tensorboard (needs the tensorboard package)


@dataclass(frozen=True)
class StageConfig:
    """One training stage's own recipe ([stages.pose], [stages.rgb], [stages.epamnet]). A key left out (None) takes
    the value of the same key in [train] or [optim]; the pipeline defaults to "multimodal"."""
    pipeline: Optional[str] = None   # epamx.data.pipelines: "multimodal", "pose_only" (pose), "rgb_only" (rgb)
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr_per_16: Optional[float] = None
    momentum: Optional[float] = None
    weight_decay: Optional[float] = None
    nesterov: Optional[bool] = None
    warmup_iters: Optional[int] = None
    clip_grad: Optional[float] = None
    min_lr: Optional[float] = None
    amp: Optional[str] = None


@dataclass(frozen=True)
class StagesConfig:
    pose: StageConfig = field(default_factory=StageConfig)
    rgb: StageConfig = field(default_factory=StageConfig)
    epamnet: StageConfig = field(default_factory=StageConfig)


@dataclass(frozen=True)
class StageSettings:
    """A stage's resolved recipe: its [stages.<stage>] values, the rest from [train] and [optim]."""
    mode: str
    pipeline: str
    epochs: int
    batch_size: int
    lr_per_16: float
    momentum: float
    weight_decay: float
    nesterov: bool
    warmup_iters: int
    clip_grad: float
    min_lr: float
    amp: str


_STAGE_DEFAULTS = {"pipeline": "multimodal"}
_STAGE_FROM = {"epochs": "train", "batch_size": "train", "amp": "train"}  # the other keys come from [optim]


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)

    def stage(self, mode: str) -> StageSettings:
        """The recipe of stage ``mode`` ("pose", "rgb" or "epamnet")."""
        own: StageConfig = getattr(self.stages, mode)
        values = {}
        for f in dataclasses.fields(StageConfig):
            value = getattr(own, f.name)
            if value is None:
                value = _STAGE_DEFAULTS.get(f.name)
            if value is None:
                value = getattr(getattr(self, _STAGE_FROM.get(f.name, "optim")), f.name)
            values[f.name] = value
        return StageSettings(mode=mode, **values)


STAGES = ("pose", "rgb", "epamnet")  # the authors' protocol, in order
_STREAMS = {"pose": ("pose",), "rgb": ("rgb",), "epamnet": ("rgb", "pose")}  # what each stage's model reads
_AMP = ("auto", "bf16", "fp16", "off")
_CHOICES = {
    ("train", "mode"): ("rgb", "pose", "epamnet", "all"),
    ("train", "amp"): _AMP,
    ("data", "keypoint_flip"): ("mirror", "authors"),
    **{("stages", s, "pipeline"): ("multimodal", "pose_only", "rgb_only") for s in STAGES},
    **{("stages", s, "amp"): _AMP for s in STAGES},
    ("train", "metric"): ("top1", "top5", "mean_class_accuracy"),
    ("model", "channels_last"): (True, False, "auto"),
    ("model", "inference_dtype"): ("float32", "bfloat16"),
}
_POSITIVE = {("model", "pose_channels"), ("train", "epochs"), ("train", "batch_size"), ("optim", "lr_per_16"),
             *{("stages", s, k) for s in STAGES for k in ("epochs", "batch_size", "lr_per_16")}}
_NON_NEGATIVE = {("model", "num_classes"), ("train", "workers"), ("train", "eval_every_epochs"),
                 ("train", "checkpoint_every_iters"), ("train", "keep_checkpoints"), ("optim", "weight_decay"),
                 ("optim", "momentum"), ("optim", "warmup_iters"), ("optim", "clip_grad"), ("optim", "min_lr"),
                 *{("stages", s, k) for s in STAGES
                   for k in ("momentum", "weight_decay", "warmup_iters", "clip_grad", "min_lr")}}


# The EPAM-Net stage was called "fused" before it had a name of its own ("fused" now means only the C++ kernels,
# model.fused); and per-stage epochs and learning rates were keys of [train] and [optim] before each stage had its
# own table. Configs and overrides that still say so are read with the new names, with a warning.
_MOVED = {
    **{("train", f"{s}_epochs"): ("stages", s, "epochs") for s in STAGES},
    **{("optim", f"{s}_lr_per_16"): ("stages", s, "lr_per_16") for s in STAGES},
    ("train", "fused_epochs"): ("stages", "epamnet", "epochs"),
    ("optim", "fused_lr_per_16"): ("stages", "epamnet", "lr_per_16"),
}
_VALUE_ALIASES = {("train", "mode"): {"fused": "epamnet"}}


def _moved(path: Tuple[str, ...], source: str) -> Optional[Tuple[str, ...]]:
    """The new place of a key that moved (with a FutureWarning), else None."""
    new = _MOVED.get(tuple(path))
    if new is None:
        return None
    why = " (the EPAM-Net stage is called 'epamnet')" if "fused" in path[-1] else ""
    warnings.warn(f"{source}: {'.'.join(path)} is now {'.'.join(new)}{why}; read as that", FutureWarning,
                  stacklevel=5)
    return new


def _move_keys(raw: Dict[str, Any], source: str) -> None:
    """Move the per-stage keys of [train] and [optim] that have their own place now ([stages.<stage>]); the old
    keys' 0 meant "not set"."""
    for old in list(_MOVED):
        table = raw.get(old[0])
        if not isinstance(table, dict) or old[1] not in table:
            continue
        new = _moved(old, source)
        value = table.pop(old[1])
        if value == 0 and not isinstance(value, bool):
            continue
        stages = raw.setdefault("stages", {})
        stage = stages.setdefault(new[1], {}) if isinstance(stages, dict) else None
        if not isinstance(stage, dict):
            raise ConfigError(f"{source}: [stages.{new[1]}] must be a table")
        if new[2] in stage and stage[new[2]] != value:
            raise ConfigError(f"{source}: {'.'.join(old)} = {value!r} contradicts {'.'.join(new)} = "
                              f"{stage[new[2]]!r}; keep only {'.'.join(new)}")
        stage[new[2]] = value


def _alias_value(path: Tuple[str, ...], value: Any, source: str) -> Any:
    aliases = _VALUE_ALIASES.get(path)
    if not aliases or not isinstance(value, str) or value not in aliases:
        return value
    warnings.warn(f"{source}: {'.'.join(path)} = {value!r} is now {aliases[value]!r} (the EPAM-Net stage); read as "
                  f"that", FutureWarning, stacklevel=4)
    return aliases[value]


# ---- parsing and validation --------------------------------------------------------------------------------------

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin in (list, List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp) -> Any:
    """``value`` as type ``tp`` (int accepted for float), or raise TypeError."""
    origin = typing.get_origin(tp)
    if origin is Union:
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg)
            except TypeError:
                pass
        raise TypeError
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        (item,) = typing.get_args(tp)
        return [_convert(v, item) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError


def _suggest(key: str, names: Sequence[str]) -> str:
    """"; did you mean 'x'?" for the closest valid key (one the typo begins is closest: lr -> lr_per_16), else the
    list of valid keys."""
    close = [n for n in names if n.startswith(key)] if len(key) >= 2 else []
    close = close or difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"


def _build(cls, table: Dict[str, Any], path: Tuple[str, ...], source: str):
    """An instance of dataclass ``cls`` from a TOML table, strictly."""
    where = f"[{'.'.join(path)}]" if path else "the top level"
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {where} must be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in table.items():
        value = _alias_value(path + (key,), value, source)
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{key}' in {where}{_suggest(key, names)}")
        tp = hints[key]
        dotted = ".".join(path + (key,))
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path + (key,), source)
            continue
        try:
            kwargs[key] = _convert(value, tp)
        except TypeError:
            raise ConfigError(f"{source}: {dotted} must be {_type_name(tp)}, got {value!r}") from None
        if isinstance(kwargs[key], float) and not math.isfinite(kwargs[key]):
            raise ConfigError(f"{source}: {dotted} must be finite, got {value!r}")
        choices = _CHOICES.get(path + (key,))
        if choices is not None and kwargs[key] not in choices:
            raise ConfigError(f"{source}: {dotted} must be one of "
                              f"{', '.join(_toml_value(c) for c in choices)}, got {_toml_value(value)}")
        if path + (key,) in _POSITIVE and not kwargs[key] > 0:
            raise ConfigError(f"{source}: {dotted} must be > 0, got {value!r}")
        if path + (key,) in _NON_NEGATIVE and not kwargs[key] >= 0:
            raise ConfigError(f"{source}: {dotted} must be >= 0, got {value!r}")
    return cls(**kwargs)


def parse_override(text: str) -> Tuple[Tuple[str, ...], Any]:
    """``"optim.lr_per_16=0.002"`` -> (("optim", "lr_per_16"), 0.002). The value is read as a TOML literal
    (``3``, ``1e-3``, ``true``, ``"x"``, ``["a.pt", "b.pt"]``); anything that is not one is a bare string."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.epochs=3")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return tuple(key.split(".")), value


def _apply_override(raw: Dict[str, Any], text: str) -> None:
    path, value = parse_override(text)
    moved = _moved(path, f"override {text!r}")
    if moved is not None:
        if value == 0 and not isinstance(value, bool):  # the old "0: not set", now: leave the key out
            table = raw.get("stages", {}).get(moved[1], {})
            if isinstance(table, dict):
                table.pop(moved[2], None)
            return
        path = moved
    cls, table = Config, raw
    for i, part in enumerate(path):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            where = f"[{'.'.join(path[:i])}]" if i else "the top level"
            raise ConfigError(f"override {text!r}: unknown key '{part}' in {where}{_suggest(part, names)}")
        tp = typing.get_type_hints(cls)[part]
        last = i == len(path) - 1
        if dataclasses.is_dataclass(tp):
            if last:
                raise ConfigError(f"override {text!r}: '{'.'.join(path)}' is a table; set one of its keys, "
                                  f"e.g. {'.'.join(path)}.{dataclasses.fields(tp)[0].name}=...")
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"override {text!r}: '{'.'.join(path[:i + 1])}' is not a table in the file")
            cls = tp
        elif not last:
            raise ConfigError(f"override {text!r}: '{'.'.join(path[:i + 1])}' is a value, not a table")
        else:
            table[part] = value


def config_from_dict(raw: Dict[str, Any], overrides: Sequence[str] = (), source: str = "<dict>",
                     name: str = "run") -> Config:
    """A Config from a parsed TOML document plus overrides; ``name`` names the default out_dir (runs/<name>)."""
    raw = _deep_copy(raw)
    _move_keys(raw, source)
    for text in overrides:
        _apply_override(raw, text)
    source = source + (f" (with overrides {', '.join(overrides)})" if overrides else "")
    config = _build(Config, raw, (), source)
    _check_consistent(config, source)
    if not config.train.out_dir:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, out_dir=f"runs/{name}"))
    return config


def _check_consistent(config: Config, source: str) -> None:
    """Settings that are valid alone but contradict each other: one line naming the keys and values."""
    from epamx.data.pipelines import get_pipeline

    d = config.data
    if d.clip_len % d.rgb_every:
        raise ConfigError(f"{source}: data.clip_len = {d.clip_len} must be a multiple of data.rgb_every = "
                          f"{d.rgb_every} (the RGB stream reads every rgb_every-th pose frame)")
    stages = STAGES if config.train.mode == "all" else (config.train.mode,)
    for mode in stages:
        pipeline = config.stage(mode).pipeline
        problem = get_pipeline(pipeline).check_streams(_STREAMS[mode])
        if problem:
            raise ConfigError(f"{source}: stages.{mode}.pipeline = {pipeline!r}: {problem}, which the {mode} stage "
                              f"reads; use 'multimodal'" + (f" or '{mode}_only'" if mode != "epamnet" else ""))
    if "epamnet" in stages and d.frame_size != 4 * d.heatmap_size:
        raise ConfigError(f"{source}: data.frame_size = {d.frame_size} must be 4 x data.heatmap_size = "
                          f"{d.heatmap_size} for the EPAM-Net stage (its attention maps pose features onto RGB "
                          f"features of the same size)")


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _shipped(name: str):
    return importlib.resources.files("epamx") / "configs" / f"{name}.toml"


def available_configs() -> List[str]:
    """Names of the configs shipped in epamx/configs (``load_config(name)``)."""
    folder = importlib.resources.files("epamx") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_config(name_or_path: Union[str, os.PathLike] = "embedded", overrides: Sequence[str] = ()) -> Config:
    """The config shipped as ``epamx/configs/<name>.toml``, or the TOML file at a path, with ``overrides``
    (``section.key=value`` strings) applied before validation."""
    text_name = os.fspath(name_or_path)
    if os.path.isfile(text_name):
        with open(text_name, "rb") as f:
            data, source = f.read(), text_name
        name = os.path.splitext(os.path.basename(text_name))[0]
    elif os.sep not in text_name and "/" not in text_name and not text_name.endswith(".toml") \
            and _shipped(text_name).is_file():
        data, source, name = _shipped(text_name).read_bytes(), f"epamx/configs/{text_name}.toml", text_name
    else:
        raise ConfigError(f"no config {text_name!r}: neither a file nor one of the shipped configs "
                          f"({', '.join(available_configs())})")
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return config_from_dict(raw, overrides, source, name)


# ---- writing ----------------------------------------------------------------------------------------------------

def override(key: str, value: Any) -> str:
    """The override ``key=value`` with ``value`` written as a TOML literal (strings quoted and escaped), which
    :func:`parse_override` reads back to ``value``."""
    return f"{key}={_toml_value(value)}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if value != value else ("inf" if value > 0 else "-inf"))
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_char(c: str) -> str:
    if c == '"':
        return '\\"'
    if c == "\\":
        return "\\\\"
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\u{ord(c):04x}"
    return c


def _write_table(obj, path: Tuple[str, ...], lines: List[str]) -> None:
    values, tables = [], []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:  # not set: left out, so that it takes its default
            continue
        (tables if dataclasses.is_dataclass(value) else values).append((f.name, value))
    if path and (values or not tables):  # a table of tables alone needs no header of its own
        lines.append(f"[{'.'.join(path)}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values)
        lines.append("")
    elif not path:
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values)
    for k, v in tables:
        _write_table(v, path + (k,), lines)


def to_toml(config: Config) -> str:
    """The config as TOML; ``load_config`` reads it back to an equal Config."""
    lines: List[str] = []
    _write_table(config, (), lines)
    return "\n".join(lines).rstrip() + "\n"

