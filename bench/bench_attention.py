"""EPAM-Net's spatial-temporal attention, forward + backward, fused ops against the eager composition the authors
use: RGB features x (12, 432, 16, 7, 7) guided by pose features (12, 216, 48, 7, 7), and a larger
(64, 432, 16, 14, 14) with pose (64, 216, 48, 14, 14).

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


@pytest.mark.parametrize("impl", ["reference", "fused", "copy"])
@pytest.mark.parametrize("case,dtype", [("epamnet", torch.float32), ("epamnet", torch.bfloat16),
                                        ("large", torch.float32)], ids=["epamnet-fp32", "epamnet-bf16", "large-fp32"])
def test_attention_reweight(measure, device, case, dtype, impl):
    rgb_shape, _ = CASES[case]
    n, _, t, h, w = rgb_shape
    x = torch.randn(rgb_shape, device=device, dtype=dtype, requires_grad=True)
    s = torch.rand(n, 1, t, h, w, device=device, dtype=dtype, requires_grad=True)
    a = torch.rand(n, 1, t, 1, 1, device=device, dtype=dtype, requires_grad=True)
    fn = attention_reweight if impl == "fused" else attention_reweight_reference
    nbytes = 5 * x.numel() * x.element_size()  # forward: read x, write out; backward: read g and x, write dx
    run = _copy_of(nbytes, device) if impl == "copy" else _fwd_bwd(fn, (x, s, a), torch.randn_like(x))
    measure("attention_reweight fwd+bwd", f"{case} {rgb_shape} {str(dtype)[6:]}", impl, run, nbytes, device)


@pytest.mark.parametrize("impl", ["reference", "fused", "copy"])
@pytest.mark.parametrize("case,dtype", [("epamnet", torch.float32), ("epamnet", torch.bfloat16),
                                        ("large", torch.float32)], ids=["epamnet-fp32", "epamnet-bf16", "large-fp32"])
def test_channel_pool(measure, device, case, dtype, impl):
    _, pose_shape = CASES[case]
    x = torch.randn(pose_shape, device=device, dtype=dtype, requires_grad=True)
    fn = channel_pool if impl == "fused" else channel_pool_reference
    grad = torch.randn_like(channel_pool_reference(x.detach(), T_STRIDE))
    # forward reads the strided frames; backward reads them again (arg-max) and writes all of dx
    nbytes = (2 * _numel(pose_shape) // T_STRIDE + _numel(pose_shape)) * x.element_size()
    run = _copy_of(nbytes, device) if impl == "copy" else _fwd_bwd(lambda v: fn(v, T_STRIDE), (x,), grad)
    measure("channel_pool fwd+bwd", f"{case} {pose_shape} {str(dtype)[6:]}", impl, run, nbytes, device)


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("case", ["epamnet", "large"])
def test_spatial_temporal_attention(measure, device, case, impl):
    rgb_shape, pose_shape = CASES[case]
    module = SpatialTemporalAttention(t_stride=T_STRIDE, fused=impl == "fused").to(device)
    rgb = torch.randn(rgb_shape, device=device, requires_grad=True)
    pose = torch.randn(pose_shape, device=device, requires_grad=True)
    nbytes = 5 * rgb.numel() * 4 + (2 * pose.numel() // T_STRIDE + pose.numel()) * 4
    measure("SpatialTemporalAttention fwd+bwd", f"{case} {rgb_shape} + {pose_shape}", impl,
            _fwd_bwd(module, (rgb, pose), torch.randn_like(rgb)), nbytes, device)
