"""Training checkpoints: written atomically, read without running code, complete enough to resume bit for bit.

A stage's folder holds ``checkpoints/step_XXXXXXXX.pt`` (every N iterations, the newest few kept),
``checkpoints/epoch_XXX.pt`` (after every epoch), a ``latest`` pointer naming the newest of them, and ``final.pt``
(the trained weights, what ``init_from``, evaluation and prediction read).

Every file is written to a temporary file in the same folder, flushed and fsync'ed, renamed over the target with
``os.replace`` and the folder fsync'ed, so a crash at any point leaves either the old file or the new one, never a
torn one, and ``latest`` always names a complete checkpoint.

A checkpoint holds only tensors, numbers, strings, lists and dicts (RNG states included, as tensors), so it loads
with ``torch.load(weights_only=True)`` and no allow-listed types: a file with any other pickled object is refused
before that object's code can run.
"""
from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
import torch

from epamx.errors import CheckpointError
from epamx.models.checkpoint import FORMAT, read_checkpoint
from epamx.records import atomic_write_bytes

__all__ = ["CheckpointError", "FORMAT", "capture_rng_state", "check_compatible",
           "latest_checkpoint", "load_checkpoint", "prune_checkpoints", "restore_rng_state", "save_checkpoint",
           "write_latest"]

PathLike = Union[str, os.PathLike]


def _save_atomic(obj: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    # A checkpoint that cannot be read back weights-only could never be resumed from: refuse to write it.
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: the checkpoint holds an object torch.load(weights_only=True) refuses; store "
                              f"only tensors, numbers, strings, lists and dicts ({exc})") from None
    return atomic_write_bytes(path, data)


# ---- RNG state as tensors (no pickled numpy or tuple objects) ------------------------------------------------------

def capture_rng_state() -> Dict[str, Any]:
    """Every global RNG's state: torch CPU, each CUDA device, NumPy's global RandomState, Python's random."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": py_gauss},
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Undo :func:`capture_rng_state`: every global RNG continues exactly where it was captured."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))


# ---- checkpoints -------------------------------------------------------------------------------------------------

def write_latest(folder: PathLike, checkpoint: PathLike) -> None:
    """Point ``folder/latest`` at ``checkpoint`` (a path relative to ``folder``), atomically."""
    folder = Path(folder)
    relative = os.path.relpath(checkpoint, folder)
    atomic_write_bytes(folder / "latest", (json.dumps({"checkpoint": relative}) + "\n").encode())


def latest_checkpoint(folder: PathLike) -> Optional[Path]:
    """The checkpoint ``folder/latest`` names, or None when there is no pointer. A pointer to a missing file is
    an error: something deleted it, and silently starting over would lose the run."""
    pointer = Path(folder) / "latest"
    if not pointer.is_file():
        return None
    try:
        target = Path(folder) / json.loads(pointer.read_text())["checkpoint"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{pointer}: not a checkpoint pointer ({exc})") from None
    if not target.is_file():
        raise CheckpointError(f"{pointer} names {target}, which does not exist; delete {pointer} to start the stage "
                              f"over, or restore the file")
    return target


def save_checkpoint(state: Mapping[str, Any], path: PathLike, *, folder: Optional[PathLike] = None) -> Path:
    """Write a checkpoint dict atomically; with ``folder``, then point ``folder/latest`` at it.

    ``state`` must hold only what ``torch.load(weights_only=True)`` reads back: tensors, numbers, strings, None,
    lists, tuples and dicts of them (:func:`capture_rng_state` stores RNG states that way).
    """
    path = _save_atomic({"format": FORMAT, **state}, Path(path))
    if folder is not None:
        write_latest(folder, path)
    return path


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """An epamx checkpoint's dict (a training state or a stage's final weights), read by
    :func:`epamx.models.read_checkpoint`: plain data and tensors only, anything else refused before it can run."""
    checkpoint = read_checkpoint(path, map_location).require_epamx()
    return {**checkpoint.data, "meta": checkpoint.meta}


def check_compatible(checkpoint: Mapping[str, Any], path: PathLike, **expected: Any) -> None:
    """Raise CheckpointError naming ``path`` and every difference between ``checkpoint['meta']`` and ``expected``
    (e.g. mode="fused", num_classes=60, pose_channels=17)."""
    meta = checkpoint.get("meta", {})
    differences = []
    for key, want in expected.items():
        have = meta.get(key)
        if have != want:
            if key == "num_classes":
                differences.append(f"checkpoint has {have} classes, model {want}")
            else:
                differences.append(f"checkpoint's {key} is {have!r}, this run's {want!r}")
    if differences:
        raise CheckpointError(f"{path}: " + "; ".join(differences))


def prune_checkpoints(folder: PathLike, pattern: str, keep: int, protect: Optional[PathLike] = None) -> List[Path]:
    """Delete all but the newest ``keep`` files matching ``pattern`` in ``folder`` (names sort by age), never
    ``protect`` (the one ``latest`` names). Returns the deleted paths."""
    files = sorted(Path(folder).glob(pattern))
    doomed = files[:-keep] if keep > 0 else files
    protect = Path(protect).resolve() if protect is not None else None
    deleted = []
    for path in doomed:
        if protect is not None and path.resolve() == protect:
            continue
        path.unlink(missing_ok=True)
        deleted.append(path)
    return deleted
