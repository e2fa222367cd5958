"""A run's records: files written atomically, the JSON-lines log, the environment, and an evaluation's report.

Every file is written to a temporary file in the same folder, flushed and fsync'ed, renamed over the target with
``os.replace`` and the folder fsync'ed: a crash at any point leaves the old file or the new one, never a torn one.
Training (``epamx.train``) and evaluation (``epamx.inference``, ``epamx eval``) write through these functions.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

__all__ = ["JsonLog", "atomic_write_bytes", "atomic_write_text", "environment_info", "installation_info",
           "write_evaluation_report", "write_json"]

PathLike = Union[str, os.PathLike]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms (Windows); the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def environment_info(world_size: int = 1) -> Dict[str, Any]:
    """Versions and the git commit (when epamx runs from a checkout) a run records in environment.json."""
    import torch

    import epamx

    info = {"epamx": epamx.__version__, "torch": str(torch.__version__), "python": platform.python_version(),
            "platform": platform.platform(), "cuda": torch.version.cuda,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "world_size": world_size, "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    package = Path(epamx.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=package,
                                   capture_output=True, text=True, timeout=10)
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def installation_info() -> Dict[str, Any]:
    """What ``epamx info`` prints: versions, the compiled backends and CPU kernels, threads, GPUs, operators."""
    import torch

    import epamx

    build = epamx.build_info()
    backends = ["CPU"] + ([f"CUDA (archs {build['cuda_archs']})"] if build["cuda"] else [])
    return {
        "epamx": epamx.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "compiled backends": backends,
        "built against torch": build["torch_version"],
        "compiler": build["cxx_compiler"],
        "OpenMP": build["openmp"],
        "CPU kernels": build["cpu_isa"],
        "torch threads": torch.get_num_threads(),
        "CUDA runtime (built)": build["cuda_runtime_version"],
        "CUDA available": torch.cuda.is_available(),
        "GPUs": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "operators": sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("epamx::")),
    }


class JsonLog:
    """A JSON-lines log (one record per line, flushed as written); ``enabled=False`` (every rank but 0) writes
    nothing. Reopened with ``keep_until_step``, records after that step (from the iterations a killed run did after
    its last checkpoint) are dropped, so a resumed run's log reads as one run."""

    def __init__(self, path: PathLike, keep_until_step: Optional[int] = None, enabled: bool = True):
        self.path = Path(path)
        self.file = None
        if not enabled:
            return
        kept = []
        if keep_until_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= keep_until_step:
                    kept.append(line + "\n")
        atomic_write_text(self.path, "".join(kept))
        self.file = open(self.path, "a", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self) -> "JsonLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_evaluation_report(folder: PathLike, evaluation, title: str, extra: Optional[Dict[str, Any]] = None) -> Path:
    """An evaluation's files in ``folder``, each written atomically: metrics.json (``extra`` first, then the
    summary and the class names), per_class.txt and confusion.png (the primary prediction's confusion matrix)."""
    from epamx.plots import plot_confusion_matrix

    folder = Path(folder)
    write_json(folder / "metrics.json", {**(extra or {}), **evaluation.summary(),
                                         "class_names": evaluation.class_names})
    atomic_write_text(folder / "per_class.txt", evaluation.per_class_table())
    plot_confusion_matrix(evaluation.confusion(), folder / "confusion.png", evaluation.class_names, title=title)
    return folder
