"""SpatialTemporalAttention: the published block (107 parameters), fused path == reference path, and both equal
to the formulas of docs/epamnet.md written out here with torch.nn.functional."""
import pytest
import torch
import torch.nn.functional as F

from epamx.nn import SpatialTemporalAttention


def formulas(module, rgb, pose):
    """S = sigmoid(BN(conv([max_c; mean_c] of every t_stride-th frame))); A = sigmoid(conv1d(mean_hw S));
    out = rgb + rgb * S * A, with the module's weights."""
    frames = pose[:, :, :: module.t_stride]
    pooled = torch.cat([frames.amax(dim=1, keepdim=True), frames.mean(dim=1, keepdim=True)], dim=1)
    k = module.kernel_size
    conv = F.conv3d(pooled, module.spatial_conv.weight, padding=(0, k // 2, k // 2))
    bn = module.spatial_bn
    spatial = torch.sigmoid(F.batch_norm(conv, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias,
                                         module.training, bn.momentum, bn.eps))
    n, _, t = spatial.shape[:3]
    temporal = torch.sigmoid(F.conv1d(spatial.mean(dim=(3, 4)).view(n, 1, t), module.temporal_conv.weight,
                                      padding=k // 2)).view(n, 1, t, 1, 1)
    return rgb + rgb * spatial * temporal


def make(n=2, c_rgb=12, c_pose=10, t=5, h=7, w=6, t_stride=3, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randn(n, c_rgb, t, h, w, generator=g).to(device=device, dtype=dtype)
    pose = torch.randn(n, c_pose, (t - 1) * t_stride + 1, h, w, generator=g).to(device=device, dtype=dtype)
    return rgb, pose


def test_published_parameter_count_and_names():
    module = SpatialTemporalAttention()
    assert sum(p.numel() for p in module.parameters()) == 107
    assert list(module.state_dict()) == ["spatial_conv.weight", "spatial_bn.weight", "spatial_bn.bias",
                                         "spatial_bn.running_mean", "spatial_bn.running_var",
                                         "spatial_bn.num_batches_tracked", "temporal_conv.weight"]
    for fact in ("kernel_size=7", "t_stride=3", "fused=True"):
        assert fact in repr(module), repr(module)


def test_epamnet_shapes():
    module = SpatialTemporalAttention().eval()
    rgb, pose = torch.randn(2, 432, 16, 7, 7), torch.randn(2, 216, 48, 7, 7)
    spatial, temporal = module.maps(pose)
    assert spatial.shape == (2, 1, 16, 7, 7) and temporal.shape == (2, 1, 16, 1, 1)
    assert module(rgb, pose).shape == rgb.shape


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_matches_the_formulas(fused, training, device):
    torch.manual_seed(0)
    module = SpatialTemporalAttention(fused=fused).to(device).train(training)
    module.spatial_bn.running_mean.fill_(0.1)
    module.spatial_bn.running_var.fill_(2.0)
    rgb, pose = make(device=device)
    expected = formulas(module, rgb, pose)
    torch.testing.assert_close(module(rgb, pose), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_and_reference_paths_agree_with_gradients(dtype, device):
    torch.manual_seed(1)
    fused = SpatialTemporalAttention(t_stride=2).to(device=device, dtype=dtype)
    reference = SpatialTemporalAttention(t_stride=2, fused=False).to(device=device, dtype=dtype)
    reference.load_state_dict(fused.state_dict())
    rgb, pose = make(c_rgb=9, c_pose=7, t=4, h=5, w=3, t_stride=2, device=device, dtype=dtype)
    inputs = {name: [rgb.clone().requires_grad_(True), pose.clone().requires_grad_(True)] for name in ("f", "r")}
    weight = torch.randn_like(rgb)
    (fused(*inputs["f"]) * weight).sum().backward()
    (reference(*inputs["r"]) * weight).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for a, b in zip(inputs["f"], inputs["r"]):
        torch.testing.assert_close(a.grad, b.grad, **tol)
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=name)
    torch.testing.assert_close(fused.spatial_bn.running_var, reference.spatial_bn.running_var, **tol)


def test_gradcheck_fp64():
    module = SpatialTemporalAttention(kernel_size=3, t_stride=2).double().eval()
    rgb, pose = make(n=1, c_rgb=3, c_pose=4, t=3, h=3, w=4, t_stride=2, dtype=torch.float64)
    assert torch.autograd.gradcheck(module, (rgb.requires_grad_(True), pose.requires_grad_(True)))


def test_bfloat16_under_autocast(device):
    module = SpatialTemporalAttention().to(device).eval()
    rgb, pose = make(device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = module(rgb, pose)
    torch.testing.assert_close(out.float(), formulas(module, rgb, pose), rtol=2e-2, atol=2e-2)


def test_compile_fullgraph(device):
    module = SpatialTemporalAttention().to(device)
    rgb, pose = make(device=device)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(rgb, pose), module(rgb, pose))


@pytest.mark.parametrize("kwargs,message", [
    (dict(kernel_size=4), "kernel_size must be an odd int >= 1, got 4"),
    (dict(t_stride=0), "t_stride must be an int >= 1, got 0"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpatialTemporalAttention(**kwargs)


@pytest.mark.parametrize("rgb_shape,pose_shape,message", [
    ((2, 8, 16, 7, 7), (2, 6, 45, 7, 7), r"ceil\(45 / 3\) = 15 equal to the RGB frames T = 16"),
    ((2, 8, 16, 7, 7), (1, 6, 48, 7, 7), "expected the same N, H, W"),
    ((2, 8, 16, 7, 7), (2, 6, 48, 14, 14), "expected the same N, H, W"),
    ((2, 8, 16, 49), (2, 6, 48, 7, 7), "rgb_feats must be 5-D"),
    ((2, 8, 16, 7, 7), (2, 6, 48, 49), "pose_feats must be 5-D"),
])
def test_mismatched_features_are_explained(rgb_shape, pose_shape, message):
    with pytest.raises(ValueError, match=message):
        SpatialTemporalAttention()(torch.randn(rgb_shape), torch.randn(pose_shape))
