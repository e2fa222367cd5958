"""Loading the native extension epamx._C, with errors that say how to fix a missing or mismatched build."""
from __future__ import annotations

import importlib
from typing import Any

import torch

_C = None


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def load_extension():
    """Import epamx._C (registering torch.ops.epamx.*) and check it was built against this torch."""
    global _C
    if _C is not None:
        return _C
    try:
        module = importlib.import_module("epamx._C")
    except ImportError as exc:
        raise ImportError(
            "epamx's native extension epamx._C could not be loaded. Build it against the installed torch with\n"
            "    pip install -e . --no-build-isolation\n"
            f"(torch {torch.__version__} is installed; the loader said: {exc})"
        ) from exc
    built_with = module.build_info()["torch_version"]
    if _major_minor(built_with) != _major_minor(torch.__version__):
        raise ImportError(
            f"epamx._C was built against torch {built_with} but torch {torch.__version__} is installed; "
            "rebuild it with: pip install -e . --no-build-isolation"
        )
    _C = module
    return module


def build_info() -> dict[str, Any]:
    """How the native extension was built: version, torch, compiler, OpenMP, CUDA and its architectures."""
    return dict(load_extension().build_info())
