"""Temporal shift on EPAM-Net's tensors: the fused op (out of place and in place) against the reference
zeros_like + slicing (what the authors' code and the TSM repository do), and a plain copy of the same tensor as
the bandwidth yardstick; contiguous and channels_last_3d (the copy keeps the layout).

Goals: CPU >= 3x the reference; CUDA >= 85% of the device-to-device copy bandwidth for the bytes moved."""
import pytest
import torch

from epamx.ops import temporal_shift, temporal_shift_, temporal_shift_reference

# name -> ((N, C, T, H, W), fold_div): the first and last RGB stages and the first pose stage, batch 12.
CASES = {
    "rgb_stage1": ((12, 24, 16, 112, 112), 8),
    "rgb_stage4": ((12, 192, 16, 7, 7), 8),
    "pose_stage1": ((12, 24, 48, 56, 56), 4),
}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}


def bytes_moved(impl, shape, fold_div, element_size):
    n, c, t, h, w = shape
    numel = n * c * t * h * w
    if impl == "fused_inplace":
        # Each shifted channel's T-1 surviving frames are read and written, one frame is zeroed.
        fold = c // fold_div
        return n * 2 * fold * h * w * (2 * (t - 1) + 1) * element_size
    return 2 * numel * element_size  # read everything once, write everything once


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_temporal_shift(compare, device, dtype, case, layout):
    shape, fold_div = CASES[case]
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=LAYOUTS[layout])
    out = torch.empty_like(x)
    impls = {"reference": lambda: temporal_shift_reference(x, fold_div),
             "fused": lambda: temporal_shift(x, fold_div),
             "fused_inplace": lambda: temporal_shift_(x, fold_div),
             "copy": lambda: out.copy_(x)}
    label = f"{case} {tuple(shape)} {str(dtype).replace('torch.', '')} {layout}"
    compare("temporal_shift", label, impls, device=device,
            bytes_moved={impl: bytes_moved(impl, shape, fold_div, x.element_size()) for impl in impls})
