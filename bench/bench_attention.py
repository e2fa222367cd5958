"""EPAM-Net's spatial-temporal attention, forward + backward, fused ops against the eager composition the authors
use: RGB features x (12, 432, 16, 7, 7) guided by pose features (12, 216, 48, 7, 7), and a larger
(64, 432, 16, 14, 14) with pose (64, 216, 48, 14, 14); each with contiguous and with channels_last_3d inputs (the
layout the model runs in on a CPU), a copy of the same bytes as the bandwidth yardstick.

Goals: CPU >= 2x eager; CUDA >= 3x eager and >= 80% of the memory-bandwidth roofline."""
import pytest
import torch

from epamx.nn import SpatialTemporalAttention
from epamx.ops import attention_reweight, attention_reweight_reference, channel_pool, channel_pool_reference

CASES = {
    "epamnet": ((12, 432, 16, 7, 7), (12, 216, 48, 7, 7)),
    "large": ((64, 432, 16, 14, 14), (64, 216, 48, 14, 14)),
}
T_STRIDE = 3
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
SIZES = pytest.mark.parametrize("case,dtype", [("epamnet", torch.float32), ("epamnet", torch.bfloat16),
                                               ("large", torch.float32)],
                                ids=["epamnet-fp32", "epamnet-bf16", "large-fp32"])


def _numel(shape):
    out = 1
    for s in shape:
        out *= s
    return out


def _copy_of(nbytes, device):
    """The roofline yardstick: a device copy that reads and writes `nbytes` in all (the bench table's vs-copy)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _fwd_bwd(fn, inputs, grad):
    def run():
        for v in inputs:
            v.grad = None
        fn(*inputs).backward(grad)
    return run


def _leaf(shape, device, dtype, layout, rand=torch.randn):
    return rand(shape, device=device, dtype=dtype).contiguous(memory_format=LAYOUTS[layout]).requires_grad_()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@SIZES
def test_attention_reweight(compare, device, case, dtype, layout):
    rgb_shape, _ = CASES[case]
    n, _, t, h, w = rgb_shape
    x = _leaf(rgb_shape, device, dtype, layout)
    s = _leaf((n, 1, t, h, w), device, dtype, layout, torch.rand)
    a = torch.rand(n, 1, t, 1, 1, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)  # x's layout
    nbytes = 5 * x.numel() * x.element_size()  # forward: read x, write out; backward: read g and x, write dx
    compare("attention_reweight fwd+bwd", f"{case} {rgb_shape} {str(dtype)[6:]} {layout}",
            {"reference": _fwd_bwd(attention_reweight_reference, (x, s, a), grad),
             "fused": _fwd_bwd(attention_reweight, (x, s, a), grad),
             "copy": _copy_of(nbytes, device)}, device=device, bytes_moved=nbytes)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@SIZES
def test_channel_pool(compare, device, case, dtype, layout):
    _, pose_shape = CASES[case]
    x = _leaf(pose_shape, device, dtype, layout)
    grad = torch.randn_like(channel_pool_reference(x.detach(), T_STRIDE))
    # forward reads the strided frames; backward reads them again (arg-max) and writes all of dx
    nbytes = (2 * _numel(pose_shape) // T_STRIDE + _numel(pose_shape)) * x.element_size()
    compare("channel_pool fwd+bwd", f"{case} {pose_shape} {str(dtype)[6:]} {layout}",
            {"reference": _fwd_bwd(lambda v: channel_pool_reference(v, T_STRIDE), (x,), grad),
             "fused": _fwd_bwd(lambda v: channel_pool(v, T_STRIDE), (x,), grad),
             "copy": _copy_of(nbytes, device)}, device=device, bytes_moved=nbytes)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", ["epamnet", "large"])
def test_spatial_temporal_attention(compare, device, case, layout):
    rgb_shape, pose_shape = CASES[case]
    rgb = _leaf(rgb_shape, device, torch.float32, layout)
    pose = _leaf(pose_shape, device, torch.float32, layout)
    grad = torch.randn_like(rgb)
    impls = {}
    for impl in ("reference", "fused"):
        module = SpatialTemporalAttention(t_stride=T_STRIDE, fused=impl == "fused").to(device)
        impls[impl] = _fwd_bwd(module, (rgb, pose), grad)
    nbytes = 5 * rgb.numel() * 4 + (2 * pose.numel() // T_STRIDE + pose.numel()) * 4
    compare("SpatialTemporalAttention fwd+bwd", f"{case} {rgb_shape} + {pose_shape} {layout}", impls, device=device,
            bytes_moved=nbytes)
