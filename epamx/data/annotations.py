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

import importlib
import io
import math
import os
import pickle
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from epamx.errors import DataError, DataFileNotFound
from epamx.records import atomic_write_bytes

__all__ = ["AnnotationError", "UnsafePickleError", "check_labels", "class_names_of", "dump_annotations",
           "inferred_class_count", "load_annotation_file", "load_annotations", "read_label_map", "safe_load_pickle",
           "validate_annotation"]

PathLike = Union[str, os.PathLike]


class AnnotationError(DataError):
    """An annotation file or entry does not hold what the format requires; the message names the file (and the
    entry)."""


class UnsafePickleError(pickle.UnpicklingError, AnnotationError):
    """A pickle asked for a type outside the annotation format (and was refused before anything ran)."""


def _numpy_globals() -> Dict[tuple, Any]:
    # NumPy 2 keeps these in numpy._core; NumPy 1.26 also has a numpy._core, a shim without them: ask the version.
    core = importlib.import_module("numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core")
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
    """Unpickle an annotation file, admitting only the types the format holds (see the module docstring). Raises
    DataFileNotFound, UnsafePickleError (a refused type) or AnnotationError (not a pickle), naming the file."""
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


# Sizes beyond any real video; bounding them keeps frame indices and image sides exact in int32 and float32.
_MAX_SIZE = 2 ** 31 - 1


def validate_annotation(ann: Any, source: str, position: int, num_joints: Optional[int] = None) -> Dict[str, Any]:
    """Check one annotation entry and return it normalised: keypoint float32 (M, T, V, 2), keypoint_score float32
    (M, T, V) (ones where the file has none), label int >= 0, total_frames int in [1, 2**31), img_shape (h, w) ints
    in [1, 2**31). ``num_joints`` (the skeleton's, None for any) checks V. Keypoints and scores may be any real
    dtype and hold NaN (a missing joint). Raises AnnotationError naming ``source`` and the entry."""
    where = f"{source}: annotation {position}"
    if not isinstance(ann, dict):
        raise AnnotationError(f"{where}: expected a dict, got {type(ann).__name__}")
    if "frame_dir" in ann:
        where += f" ({ann['frame_dir']!r})"
    for key in ("frame_dir", "label", "keypoint"):
        if key not in ann:
            raise AnnotationError(f"{where}: missing key {key!r} (has {sorted(map(str, ann))})")
    if not isinstance(ann["frame_dir"], str) or not ann["frame_dir"]:
        raise AnnotationError(f"{where}: 'frame_dir' must be a non-empty string, got {ann['frame_dir']!r}")
    out = dict(ann)
    out["label"] = _label(ann["label"], where)
    out["keypoint"], out["keypoint_score"] = _keypoints(ann["keypoint"], ann.get("keypoint_score"), num_joints, where)
    m, t = out["keypoint"].shape[:2]
    total = ann.get("total_frames", t)
    if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or not 1 <= total <= _MAX_SIZE:
        raise AnnotationError(f"{where}: 'total_frames' must be an int >= 1 (and below 2**31), got {total!r}")
    if m and t != total:
        raise AnnotationError(f"{where}: 'keypoint' has {t} frames but 'total_frames' is {total}")
    out["total_frames"] = int(total)
    out["img_shape"] = _image_shape(ann.get("img_shape", ann.get("original_shape")), where)
    return out


def _label(label: Any, where: str) -> int:
    if isinstance(label, (np.ndarray, np.generic)) and np.ndim(label) == 0:
        label = label.item()
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
        raise AnnotationError(f"{where}: 'label' must be an int >= 0, got {label!r}")
    return int(label)


# Integer and floating dtypes only: a complex array would lose its imaginary part, and bool, string or object
# arrays hold no coordinates or scores.
_REAL_KINDS = "iuf"


def _array(value: Any, key: str, where: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError, RecursionError) as e:  # ragged or self-referencing nested lists
        raise AnnotationError(f"{where}: {key!r} is not an array ({type(e).__name__}: {e})") from e


def _keypoints(keypoint: Any, score: Any, num_joints: Optional[int], where: str) -> Tuple[np.ndarray, np.ndarray]:
    kp = _array(keypoint, "keypoint", where)
    if kp.ndim != 4 or kp.shape[-1] != 2 or kp.dtype.kind not in _REAL_KINDS:
        raise AnnotationError(f"{where}: 'keypoint' must be a real numeric array (M persons, T frames, V joints, 2), "
                              f"got shape {kp.shape} dtype {kp.dtype}")
    m, t, v, _ = kp.shape
    if num_joints is not None and v != num_joints:
        raise AnnotationError(f"{where}: 'keypoint' has {v} joints per person, but the skeleton has {num_joints} "
                              f"(data.skeleton: coco17 for 17 joints, ntu25 for 25, any for others)")
    if score is None:
        return kp.astype(np.float32, copy=False), np.ones((m, t, v), dtype=np.float32)
    scores = _array(score, "keypoint_score", where)
    if scores.shape != (m, t, v) or scores.dtype.kind not in _REAL_KINDS:
        raise AnnotationError(f"{where}: 'keypoint_score' must be a real numeric array of shape (M, T, V) = "
                              f"{(m, t, v)} to match 'keypoint', got shape {scores.shape} dtype {scores.dtype}")
    return kp.astype(np.float32, copy=False), scores.astype(np.float32, copy=False)


def _is_size(value: Any) -> bool:
    """An int, or a finite float (truncated to an int)."""
    if isinstance(value, (bool, np.bool_)):
        return False
    return isinstance(value, (int, np.integer)) or (isinstance(value, (float, np.floating)) and math.isfinite(value))


def _image_shape(shape: Any, where: str) -> Tuple[int, int]:
    if shape is None:
        raise AnnotationError(f"{where}: missing key 'img_shape' (the frames' (h, w)) and 'original_shape'")
    is_sequence = isinstance(shape, (tuple, list)) or (isinstance(shape, np.ndarray) and shape.ndim == 1)
    sides = list(shape) if is_sequence else []
    if len(sides) != 2 or not all(_is_size(s) for s in sides):
        raise AnnotationError(f"{where}: 'img_shape' must be (h, w), got {shape!r}")
    h, w = (int(s) for s in sides)
    if not (1 <= h <= _MAX_SIZE and 1 <= w <= _MAX_SIZE):
        raise AnnotationError(f"{where}: 'img_shape' must be positive (and below 2**31), got {shape!r}")
    return h, w


def _split_names(split: Union[str, Sequence[str]], data: Any, source: str) -> Optional[List[str]]:
    if not isinstance(split, str):
        return [str(s) for s in split]
    if isinstance(data, dict):
        splits = data.get("split")
        if not isinstance(splits, dict):
            raise AnnotationError(f"{source}: asked for split {split!r}, but the file has no 'split' dict")
        if split not in splits:
            raise AnnotationError(f"{source}: no split {split!r}; the file has {sorted(map(str, splits))}")
        names = splits[split]
        if not isinstance(names, (list, tuple, np.ndarray)):
            raise AnnotationError(f"{source}: split {split!r} must be a list of frame_dirs, got "
                                  f"{type(names).__name__}")
        return [str(s) for s in names]
    if os.path.isfile(split):
        try:
            with open(split, encoding="utf-8") as f:
                return [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise AnnotationError(f"{split}: a split file lists frame_dirs as UTF-8 text, one per line ({e})") from e
    raise AnnotationError(f"{source} is a plain list of annotations: give the split as a list of frame_dirs or a text "
                          f"file of them (one per line); {split!r} is neither an existing file nor a split name")


def load_annotations(path: PathLike, split: Union[str, Sequence[str], None] = None,
                     num_classes: Optional[int] = None, num_joints: Optional[int] = None) -> List[Dict[str, Any]]:
    """The validated annotations (``validate_annotation``) of ``split`` (a split name, a list of frame_dirs, a text
    file of them, or None for every annotation), in the split's order; every one has the same joint count V.
    ``num_classes`` checks every label is below it, ``num_joints`` that V is it. Raises AnnotationError (or
    DataFileNotFound), naming the file and the entry."""
    return load_annotation_file(path, split, num_classes, num_joints)[0]


def load_annotation_file(path: PathLike, split: Union[str, Sequence[str], None] = None,
                         num_classes: Optional[int] = None, num_joints: Optional[int] = None
                         ) -> Tuple[List[Dict[str, Any]], Optional[List[str]]]:
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
    anns = [validate_annotation(a, source, i, num_joints) for i, a in enumerate(entries)]
    if split is not None:
        names = _split_names(split, data, source)
        by_name = {a["frame_dir"]: a for a in anns}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise AnnotationError(f"{source}: split {split if isinstance(split, str) else '(given)'} names "
                                  f"{len(missing)} frame_dirs with no annotation, e.g. {missing[:3]}")
        anns = [by_name[n] for n in names]
    _check_same_joints(anns, source)
    if num_classes is not None:
        check_labels(anns, num_classes, source, "the model has")
    return anns, _classes(data)


def _check_same_joints(annotations: List[Dict[str, Any]], source: str) -> None:
    if not annotations:
        return
    first = annotations[0]
    joints = first["keypoint"].shape[2]
    for a in annotations:
        if a["keypoint"].shape[2] != joints:
            raise AnnotationError(f"{source}: annotation {a['frame_dir']!r} has {a['keypoint'].shape[2]} joints per "
                                  f"person, but {first['frame_dir']!r} has {joints}: every annotation of a dataset "
                                  f"must use the same skeleton")


def check_labels(annotations: List[Dict[str, Any]], num_classes: int, source: str, origin: str) -> None:
    """Raise AnnotationError, naming ``source`` and the entry, for a label >= ``num_classes``; ``origin`` says where
    the count comes from, completing "but <origin> <num_classes> classes" (e.g. "the model has")."""
    for a in annotations:
        if a["label"] >= num_classes:
            labels = f" (labels 0..{num_classes - 1})" if num_classes else ""
            raise AnnotationError(f"{source}: annotation {a['frame_dir']!r} has label {a['label']}, but {origin} "
                                  f"{num_classes} classes{labels}")


def inferred_class_count(annotations: List[Dict[str, Any]], source: str) -> int:
    """The class count the labels imply when nothing else gives it: the largest label + 1.

    The largest label is trusted only while the classes it leaves without any clip are at most
    max(64, the number of distinct labels): a training split that holds every class, or lacks up to half of them
    (or up to 64), always passes; a label far beyond the others (a typo, a corrupt entry, 10**9) would make a
    model with that many outputs and is an AnnotationError naming the file, the entry and the label. A dataset
    whose split really lacks most classes gives its class count (model.num_classes) or names (data.label_map).
    """
    if not annotations:
        return 0
    labels = {a["label"] for a in annotations}
    count = max(labels) + 1
    if count - len(labels) > max(64, len(labels)):
        far = max(annotations, key=lambda a: a["label"])
        raise AnnotationError(
            f"{source}: annotation {far['frame_dir']!r} has label {far['label']}, far beyond the others: the "
            f"{len(labels)} distinct labels would make {count} classes, {count - len(labels)} of them without a clip. "
            f"If the dataset has that many classes, give their count (model.num_classes) or their names "
            f"(data.label_map, one per line); otherwise the label is wrong")
    return count


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
    """Write annotations in the PoseC3D format (pickle protocol 4), atomically (epamx.records.atomic_write_bytes):
    ``path`` holds the old file or the whole new one, never a torn one."""
    data: Dict[str, Any] = {"split": split, "annotations": annotations}
    if classes is not None:
        data["classes"] = list(classes)
    atomic_write_bytes(path, pickle.dumps(data, protocol=4))
