"""epamx: fused C++/CUDA operators and modules for EPAM-Net, pose-driven attention-guided multimodal action
recognition (Abdelkawy, Ali, Farag, Neurocomputing 2025).

    import epamx
    y = epamx.ops.temporal_shift(x, fold_div=8)          # x: (N, C, T, H, W)
    shift = epamx.nn.TemporalShift(fold_div=8)

Importing epamx loads the native extension, which registers the operators as torch.ops.epamx.*.
"""
from epamx._extension import build_info, load_extension

load_extension()

from epamx import nn, ops  # noqa: E402  (the operators must be registered first)

__version__ = build_info()["version"]
__all__ = ["build_info", "nn", "ops", "__version__"]
