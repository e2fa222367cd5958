"""PoseC3D / pyskl annotation pickles: read safely, validate, select a split.

The format (as published for NTU RGB+D 60/120, and used for PKU-MMD and Toyota Smarthome)::

    {'split': {'xsub_train': [frame_dir, ...], 'xsub_val': [...], ...},
     'annotations': [{'frame_dir': str, 'label': int, 'img_shape': (h, w), 'original_shape': (h, w),
                      'total_frames': int, 'keypoint': float32 (M, T, V, 2), 'keypoint_score': float32 (M, T, V)},
                     ...]}

or a plain list of such annotation dicts, with the split given separately (a list of frame_dirs or a text file of
them, one per line). epamx's embedded dataset adds a top-level 'classes' list of class names.

These files come from the internet, and ``pickle.load`` runs whatever a crafted file asks for. So they are read
with an unpickler that admits only what the format holds (dicts, lists, tuples, strings, numbers, NumPy arrays,
dtypes and scalars) and refuses anything else before it can run, naming the file and the refused type.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from epamx.errors import DataError, DataFileNotFound

__all__ = ["AnnotationError", "UnsafePickleError", "class_names_of", "dump_annotations", "load_annotation_file",
           "load_annotations",
           "read_label_map", "safe_load_pickle", "validate_annotation"]

PathLike = Union[str, os.PathLike]


class AnnotationError(DataError):
    """An annotation file or entry does not hold what the format requires; the message names the file (and the
    entry)."""


class UnsafePickleError(pickle.UnpicklingError, AnnotationError):
    """A pickle asked for a type outside the annotation format (and was refused before anything ran)."""


def _numpy_globals() -> Dict[tuple, Any]:
    core = np._core if hasattr(np, "_core") else np.core  # NumPy 2 / NumPy 1.x
    ma, numeric = core.multiarray, core.numeric
    allowed = {}
    # Arrays, dtypes and scalars pickled by NumPy 1.x ("numpy.core") or 2.x ("numpy._core"), any protocol.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = ma._reconstruct
        allowed[(module, "scalar")] = ma.scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # Protocol 2 pickles (mmcv's default) carry array bytes as latin-1 text re-encoded by _codecs.encode.
    import _codecs
    allowed[("_codecs", "encode")] = _codecs.encode
    return allowed


class _AnnotationUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source
        self._allowed = _numpy_globals()
        # Protocol 2 pickles empty bytes (the data of an array without elements, e.g. a clip without persons) as a
        # call to bytes().
        self._allowed[("__builtin__", "bytes")] = self._allowed[("builtins", "bytes")] = self._empty_bytes

    def find_class(self, module: str, name: str):
        allowed = self._allowed.get((module, name))
        if allowed is None and module == "numpy" and name.startswith("dtype["):
            allowed = np.dtype  # NumPy 2 pickles dtypes through their class, e.g. numpy.dtype[float32]
        if allowed is None and module.startswith("numpy") and name.endswith("DType"):
            allowed = getattr(np.dtypes, name, None) if hasattr(np, "dtypes") else None
        if allowed is None:
            raise UnsafePickleError(f"{self._source}: refused to load {module}.{name}: an annotation pickle holds only "
                                    f"dicts, lists, tuples, strings, numbers and NumPy arrays (is this file what "
                                    f"you meant to load?)")
        return allowed

    def _empty_bytes(self, *args) -> bytes:
        if args:  # bytes(n) would allocate n bytes
            raise UnsafePickleError(f"{self._source}: refused bytes{args!r}: an annotation pickle calls bytes() only "
                                    f"for empty data")
        return b""

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self._source}: refused a persistent reference ({pid!r}): not an annotation pickle")


def safe_load_pickle(path_or_file: Union[PathLike, io.BufferedIOBase]) -> Any:
    """Unpickle an annotation file, admitting only the types the format holds (see the module docstring)."""
    if isinstance(path_or_file, (str, os.PathLike)):
        source = os.fspath(path_or_file)
        if not os.path.exists(source):
            raise DataFileNotFound(f"annotation file {source} does not exist")
        with open(source, "rb") as f:
            return _load(f, source)
    return _load(path_or_file, getattr(path_or_file, "name", "<annotation stream>"))


def _load(f, source: str) -> Any:
    try:
        return _AnnotationUnpickler(f, source).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise AnnotationError(f"{source}: not a readable annotation pickle ({type(e).__name__}: {e})") from e


def validate_annotation(ann: Any, source: str, position: int) -> Dict[str, Any]:
    """Check one annotation entry and return it normalised: keypoint float32 (M, T, V, 2), keypoint_score float32
    (M, T, V) (ones where the file has none), label int, total_frames int, img_shape (h, w) ints."""
    where = f"{source}: annotation {position}"
    if not isinstance(ann, dict):
        raise AnnotationError(f"{where}: expected a dict, got {type(ann).__name__}")
    if "frame_dir" in ann:
        where += f" ({ann['frame_dir']!r})"
    for key in ("frame_dir", "label", "keypoint"):
        if key not in ann:
            raise AnnotationError(f"{where}: missing key {key!r} (has {sorted(ann)})")
    out = dict(ann)
    if not isinstance(ann["frame_dir"], str) or not ann["frame_dir"]:
        raise AnnotationError(f"{where}: 'frame_dir' must be a non-empty string, got {ann['frame_dir']!r}")
    label = ann["label"]
    if isinstance(label, (np.ndarray, np.generic)) and np.ndim(label) == 0:
        label = label.item()
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
        raise AnnotationError(f"{where}: 'label' must be an int >= 0, got {ann['label']!r}")
    out["label"] = int(label)
    kp = np.asarray(ann["keypoint"])
    if kp.ndim != 4 or kp.shape[-1] != 2 or not np.issubdtype(kp.dtype, np.number):
        raise AnnotationError(f"{where}: 'keypoint' must be a numeric array (M persons, T frames, V joints, 2), got "
                              f"shape {kp.shape} dtype {kp.dtype}")
    out["keypoint"] = kp.astype(np.float32, copy=False)
    m, t, v, _ = kp.shape
    if ann.get("keypoint_score") is None:
        out["keypoint_score"] = np.ones((m, t, v), dtype=np.float32)
    else:
        score = np.asarray(ann["keypoint_score"])
        if score.shape != (m, t, v) or not np.issubdtype(score.dtype, np.number):
            raise AnnotationError(f"{where}: 'keypoint_score' must be a numeric array of shape (M, T, V) = "
                                  f"{(m, t, v)} to match 'keypoint', got shape {score.shape} dtype {score.dtype}")
        out["keypoint_score"] = score.astype(np.float32, copy=False)
    total = ann.get("total_frames", t)
    if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or total < 1:
        raise AnnotationError(f"{where}: 'total_frames' must be an int >= 1, got {total!r}")
    if m and t != total:
        raise AnnotationError(f"{where}: 'keypoint' has {t} frames but 'total_frames' is {total}")
    out["total_frames"] = int(total)
    shape = ann.get("img_shape", ann.get("original_shape"))
    if shape is None:
        raise AnnotationError(f"{where}: missing key 'img_shape' (the frames' (h, w)) and 'original_shape'")
    try:
        h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise AnnotationError(f"{where}: 'img_shape' must be (h, w), got {shape!r}") from None
    if h < 1 or w < 1:
        raise AnnotationError(f"{where}: 'img_shape' must be positive, got {shape!r}")
    out["img_shape"] = (h, w)
    return out


def _split_names(split: Union[str, Sequence[str]], data: Any, source: str) -> Optional[List[str]]:
    if not isinstance(split, str):
        return [str(s) for s in split]
    if isinstance(data, dict):
        splits = data.get("split")
        if not isinstance(splits, dict):
            raise AnnotationError(f"{source}: asked for split {split!r}, but the file has no 'split' dict")
        if split not in splits:
            raise AnnotationError(f"{source}: no split {split!r}; the file has {sorted(splits)}")
        return [str(s) for s in splits[split]]
    if os.path.isfile(split):
        with open(split, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    raise AnnotationError(f"{source} is a plain list of annotations: give the split as a list of frame_dirs or a text "
                          f"file of them (one per line); {split!r} is neither an existing file nor a split name")


def load_annotations(path: PathLike, split: Union[str, Sequence[str], None] = None,
                     num_classes: Optional[int] = None) -> List[Dict[str, Any]]:
    """The validated annotations of ``split`` (a split name, a list of frame_dirs, a text file of them, or None for
    every annotation), in the split's order. ``num_classes`` checks every label is below it."""
    return load_annotation_file(path, split, num_classes)[0]


def load_annotation_file(path: PathLike, split: Union[str, Sequence[str], None] = None,
                         num_classes: Optional[int] = None) -> Tuple[List[Dict[str, Any]], Optional[List[str]]]:
    """``load_annotations`` and the file's class names (``class_names_of``) from one read of the file."""
    source = os.fspath(path)
    data = safe_load_pickle(source)
    if isinstance(data, dict):
        if "annotations" not in data:
            raise AnnotationError(f"{source}: expected a dict with 'annotations' (and 'split'), or a list of "
                                  f"annotations; got a dict with keys {sorted(map(str, data))}")
        entries = data["annotations"]
    else:
        entries = data
    if not isinstance(entries, list):
        raise AnnotationError(f"{source}: 'annotations' must be a list, got {type(entries).__name__}")
    anns = [validate_annotation(a, source, i) for i, a in enumerate(entries)]
    if split is not None:
        names = _split_names(split, data, source)
        by_name = {a["frame_dir"]: a for a in anns}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise AnnotationError(f"{source}: split {split if isinstance(split, str) else '(given)'} names "
                                  f"{len(missing)} frame_dirs with no annotation, e.g. {missing[:3]}")
        anns = [by_name[n] for n in names]
    if num_classes is not None:
        for a in anns:
            if a["label"] >= num_classes:
                raise AnnotationError(f"{source}: annotation {a['frame_dir']!r} has label {a['label']}, but the model "
                                      f"has {num_classes} classes (labels 0..{num_classes - 1})")
    return anns, _classes(data)


def _classes(data: Any) -> Optional[List[str]]:
    if isinstance(data, dict) and isinstance(data.get("classes"), (list, tuple)):
        return [str(c) for c in data["classes"]]
    return None


def class_names_of(path: PathLike) -> Optional[List[str]]:
    """The 'classes' list an annotation pickle carries (epamx's embedded dataset does), or None."""
    return _classes(safe_load_pickle(path))


def read_label_map(path: PathLike) -> List[str]:
    """Class names from a text file, one per line (line i names label i). Raises DataFileNotFound for a missing
    file, AnnotationError for one that is not UTF-8 text or names no class."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except FileNotFoundError as e:
        raise DataFileNotFound(f"label map {os.fspath(path)} does not exist") from e
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{os.fspath(path)}: the label map is not UTF-8 text ({e})") from e
    if not names:
        raise AnnotationError(f"{os.fspath(path)}: the label map is empty (expected one class name per line)")
    return names


def dump_annotations(path: PathLike, annotations: List[Dict[str, Any]], split: Dict[str, List[str]],
                     classes: Optional[Sequence[str]] = None) -> None:
    """Write annotations in the PoseC3D format (atomically: a temporary file renamed into place)."""
    path = Path(path)
    data: Dict[str, Any] = {"split": split, "annotations": annotations}
    if classes is not None:
        data["classes"] = list(classes)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump(data, f, protocol=4)
    os.replace(tmp, path)
