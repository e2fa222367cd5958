"""X-ShiftNet and EPAM-Net: the published shapes and parameter counts, fused == reference path, exact in-place
inference, the authors' checkpoint names, compile, bad input."""
import io

import pytest
import torch

from epamx.errors import CheckpointError, CheckpointNotFound
from epamx.models import EPAMNet, XShiftNet, load_authors_checkpoint
from epamx.models.checkpoint import convert_authors_state_dict
from testkit import raises_naming


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def small_backbone(fused=True, **kwargs):
    """A few blocks of each kind (downsample, SE, plain) at a size a CPU runs in milliseconds."""
    config = dict(in_channels=3, base_channels=8, stage_blocks=(2, 3), stem_stride=2, fold_div=4, fused=fused)
    return XShiftNet(**{**config, **kwargs})


def randomize_batch_norm(model, seed=0):
    """Non-trivial running statistics and affine parameters (the authors' init zeroes some BN weights)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
            m.running_mean = torch.randn(m.running_mean.shape, generator=g) * 0.1
            m.running_var = torch.rand(m.running_var.shape, generator=g) + 0.5
    return model


# ---- the published architecture ----------------------------------------------------------------------------------

def test_parameter_counts_match_the_paper():
    assert n_params(XShiftNet.rgb()) == 1_980_030
    assert n_params(XShiftNet.pose()) == 519_580
    model = EPAMNet(num_classes=60)
    assert n_params(model.attention_module) == 107
    assert n_params(model) == 2_538_717
    assert n_params(EPAMNet(num_classes=120)) == 2_577_717


def test_stage_shapes():
    rgb, pose = XShiftNet.rgb().eval(), XShiftNet.pose().eval()
    shapes = {}
    hooks = [getattr(net, name).register_forward_hook(lambda m, i, o, key=(tag, name): shapes.__setitem__(key, o.shape))
             for tag, net in (("rgb", rgb), ("pose", pose)) for name in net.res_layers + ["conv5"]]
    with torch.no_grad():
        rgb(torch.randn(1, 3, 16, 224, 224))
        pose(torch.randn(1, 17, 48, 56, 56))
    for h in hooks:
        h.remove()
    assert [shapes[("rgb", f"layer{i}")][1:] for i in range(1, 5)] == [
        (24, 16, 56, 56), (48, 16, 28, 28), (96, 16, 14, 14), (192, 16, 7, 7)]
    assert shapes[("rgb", "conv5")][1:] == (432, 16, 7, 7)
    assert [shapes[("pose", f"layer{i}")][1:] for i in range(1, 4)] == [
        (24, 48, 28, 28), (48, 48, 14, 14), (96, 48, 7, 7)]
    assert shapes[("pose", "conv5")][1:] == (216, 48, 7, 7)


def test_block_structure_follows_the_reference():
    rgb = XShiftNet.rgb()
    assert [len(getattr(rgb, n)) for n in rgb.res_layers] == [3, 5, 11, 7]
    block = rgb.layer4[0]
    assert block.conv1.conv.out_channels == 432 and block.conv2.conv.groups == 432
    assert block.conv2.conv.kernel_size == (1, 3, 3) and block.conv2.conv.stride == (1, 2, 2)
    assert block.se_module.bottleneck == 32 and rgb.layer4[1].se_module is None and rgb.layer4[2].se_module is not None
    assert block.shift.fold_div == 8 and XShiftNet.pose().layer1[0].shift.fold_div == 4
    assert block.downsample is not None and rgb.layer4[1].downsample is None
    assert not any(isinstance(m, torch.nn.Conv3d) and m.kernel_size[0] > 1 for m in rgb.modules()), \
        "X-ShiftNet has no temporal convolutions"


# ---- fused == reference -----------------------------------------------------------------------------------------

def _assert_close_to_scale(got, want, rel, name=""):
    """|got - want| within rel times want's largest magnitude: for sums whose terms cancel, where the fused and
    reference paths round differently (the fused batch norm accumulates in float64)."""
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= rel * scale + 1e-12, f"{name}: max |difference| {err} > {rel} * {scale}"


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d],
                         ids=["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_fused_equals_reference_path(training, dtype, memory_format):
    """Outputs, input and parameter gradients, and (training) the running statistics; in training the fused path
    runs batch norm fused with ReLU, SE and Swish, so float32 agrees to rounding and float64 to 1e-10."""
    torch.manual_seed(0)
    fused = randomize_batch_norm(small_backbone()).train(training).to(dtype=dtype, memory_format=memory_format)
    reference = small_backbone(fused=False).train(training).to(dtype=dtype, memory_format=memory_format)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 5, 16, 12, dtype=dtype).contiguous(memory_format=memory_format)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_f, out_r = fused(a), reference(b)
    rel = 1e-10 if dtype == torch.float64 else 1e-5
    _assert_close_to_scale(out_f, out_r, rel, "output")
    weight = torch.randn_like(out_f)
    (out_f * weight).sum().backward()
    (out_r * weight).sum().backward()
    _assert_close_to_scale(a.grad, b.grad, rel, "input gradient")
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        _assert_close_to_scale(p.grad, q.grad, rel, name)
    for (name, p), q in zip(fused.named_buffers(), reference.buffers()):
        _assert_close_to_scale(p.double(), q.double(), rel, name)


def test_epamnet_fused_equals_reference_on_small_clips():
    torch.manual_seed(0)
    model = randomize_batch_norm(EPAMNet(num_classes=5)).eval()
    imgs, heatmaps = torch.randn(1, 3, 4, 64, 64), torch.rand(1, 17, 12, 16, 16)
    with torch.no_grad():
        fused = model(imgs, heatmaps)
        model.fused = False
        reference = model(imgs, heatmaps)
    for f, r in zip(fused, reference):
        torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-5)


def test_forward_with_attention_is_forward_and_its_maps():
    """The logits are forward's, and S and A are the maps the pose features give (the attention's own maps)."""
    torch.manual_seed(0)
    model = randomize_batch_norm(EPAMNet(num_classes=5)).eval()
    imgs, heatmaps = torch.randn(2, 3, 4, 64, 64), torch.rand(2, 17, 12, 16, 16)
    with torch.no_grad():
        rgb, pose, spatial, temporal = model.forward_with_attention(imgs, heatmaps)
        expected_rgb, expected_pose = model(imgs, heatmaps)
        pose_feats = model.pose_backbone(heatmaps.contiguous(memory_format=torch.channels_last_3d))
        expected_spatial, expected_temporal = model.attention_module.maps(pose_feats, 3)
    torch.testing.assert_close(rgb, expected_rgb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pose, expected_pose, rtol=1e-5, atol=1e-6)
    assert spatial.shape == (2, 1, 4, 2, 2) and temporal.shape == (2, 1, 4, 1, 1)
    torch.testing.assert_close(spatial, expected_spatial, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(temporal, expected_temporal, rtol=1e-5, atol=1e-6)


def test_inplace_inference_is_bit_exact():
    torch.manual_seed(0)
    net = randomize_batch_norm(small_backbone()).eval()
    x = torch.randn(2, 3, 6, 16, 16)
    with torch.no_grad():
        in_place = net(x)  # no autograd: every block shifts its input in place and restores it
    out_of_place = net(x.clone().requires_grad_(True))  # autograd: the out-of-place shift
    assert torch.equal(in_place, out_of_place.detach())


def test_inplace_inference_leaves_the_input_alone():
    net = small_backbone().eval()
    x = torch.randn(1, 3, 4, 8, 8)
    before = x.clone()
    with torch.no_grad():
        net(x)
    assert torch.equal(x, before)


# ---- heads, fusion, other sizes -------------------------------------------------------------------------------------

def test_forward_predict_and_other_clip_sizes():
    model = EPAMNet(num_classes=7).eval()
    imgs, heatmaps = torch.randn(2, 3, 4, 96, 96), torch.rand(2, 17, 8, 24, 24)
    rgb, pose = model(imgs, heatmaps)
    assert rgb.shape == pose.shape == (2, 7)
    torch.testing.assert_close(model.predict(imgs, heatmaps), rgb + pose)
    spatial, temporal = model.attention_module.maps(model.pose_backbone(heatmaps), t_stride=2)
    assert spatial.shape == (2, 1, 4, 3, 3) and temporal.shape == (2, 1, 4, 1, 1)


def test_forward_from_raw_keypoints():
    torch.manual_seed(0)
    model = EPAMNet(num_classes=5, heatmap_size=16).eval()
    imgs = torch.randn(2, 3, 4, 64, 64)
    g = torch.Generator().manual_seed(1)
    keypoints = torch.rand(2, 2, 12, 17, 2, generator=g) * torch.tensor([640.0, 480.0])
    scores = torch.rand(2, 2, 12, 17, generator=g)
    flip = torch.tensor([False, True])
    heatmaps = model.pose_renderer(keypoints, scores, (480, 640), flip)
    assert heatmaps.shape == (2, 17, 12, 16, 16) and heatmaps.amax() > 0.5
    with torch.no_grad():
        for got, want in zip(model.forward_keypoints(imgs, keypoints, scores, (480, 640), flip),
                             model(imgs, heatmaps)):
            torch.testing.assert_close(got, want)


def test_heads_are_initialised_like_the_authors():
    torch.manual_seed(0)
    head = EPAMNet(num_classes=120).rgb_cls_head
    assert head.fc_cls.in_features == 432 and head.dropout.p == 0.5
    assert abs(head.fc_cls.weight.std().item() - 0.01) < 0.002 and (head.fc_cls.bias == 0).all()


def test_state_dict_is_stable():
    keys = list(EPAMNet(num_classes=60).state_dict())
    assert keys[:7] == ["rgb_backbone.conv1_s.conv.weight", "rgb_backbone.conv1_s.bn.weight",
                        "rgb_backbone.conv1_s.bn.bias", "rgb_backbone.conv1_s.bn.running_mean",
                        "rgb_backbone.conv1_s.bn.running_var", "rgb_backbone.conv1_s.bn.num_batches_tracked",
                        "rgb_backbone.layer1.0.conv1.conv.weight"]
    assert "rgb_backbone.layer1.0.se_module.fc1.weight" in keys and "rgb_backbone.layer1.0.downsample.conv.weight" in keys
    assert keys[-5:] == ["attention_module.temporal_conv.weight", "rgb_cls_head.fc_cls.weight",
                         "rgb_cls_head.fc_cls.bias", "pose_cls_head.fc_cls.weight", "pose_cls_head.fc_cls.bias"]
    assert len(keys) == len(set(keys)) == len(authors_state_dict(num_classes=60))


# ---- the authors' checkpoints -----------------------------------------------------------------------------------------

def _authors_backbone_keys(prefix, in_channels, stage_blocks, bottleneck_factor=2.25):
    """Key -> shape of the authors' X3DTemporalShift(Pose) state dict, from the structure of their code
    (mmcv ConvModule = .conv + .bn; BlockX3D conv1/conv2/conv3/se_module/downsample; conv1_s; conv5)."""
    def conv_module(name, cin, cout, k=(1, 1, 1), groups=1):
        keys = {f"{name}.conv.weight": (cout, cin // groups, *k)}
        for stat in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.bn.{stat}"] = (cout,)
        keys[f"{name}.bn.num_batches_tracked"] = ()
        return keys

    def se_width(planes):
        width = planes / 16
        out = max(8, int(width + 4) // 8 * 8)
        return out + 8 if out < 0.9 * width else out

    keys = conv_module(f"{prefix}.conv1_s", in_channels, 24, (1, 3, 3))
    cin = 24
    for i, blocks in enumerate(stage_blocks):
        cout = 24 * 2 ** i
        planes = int(cout * bottleneck_factor)
        for b in range(blocks):
            name = f"{prefix}.layer{i + 1}.{b}"
            keys.update(conv_module(f"{name}.conv1", cin if b == 0 else cout, planes))
            keys.update(conv_module(f"{name}.conv2", planes, planes, (1, 3, 3), groups=planes))
            keys.update(conv_module(f"{name}.conv3", planes, cout))
            if b % 2 == 0:
                mid = se_width(planes)
                keys.update({f"{name}.se_module.fc1.weight": (mid, planes, 1, 1, 1), f"{name}.se_module.fc1.bias": (mid,),
                             f"{name}.se_module.fc2.weight": (planes, mid, 1, 1, 1), f"{name}.se_module.fc2.bias": (planes,)})
            if b == 0:
                keys.update(conv_module(f"{name}.downsample", cin, cout))
        cin = cout
    keys.update(conv_module(f"{prefix}.conv5", cin, int(cin * bottleneck_factor)))
    return keys


def authors_state_dict(num_classes, seed=0):
    shapes = _authors_backbone_keys("rgb_backbone", 3, (3, 5, 11, 7))
    shapes.update(_authors_backbone_keys("pose_backbone", 17, (5, 11, 7)))
    shapes.update({"rgb_cls_head.fc_cls.weight": (num_classes, 432), "rgb_cls_head.fc_cls.bias": (num_classes,),
                   "pose_cls_head.fc_cls.weight": (num_classes, 216), "pose_cls_head.fc_cls.bias": (num_classes,),
                   "attention_module.spatial.conv.weight": (1, 2, 1, 7, 7),
                   "attention_module.spatial.bn.weight": (1,), "attention_module.spatial.bn.bias": (1,),
                   "attention_module.spatial.bn.running_mean": (1,), "attention_module.spatial.bn.running_var": (1,),
                   "attention_module.spatial.bn.num_batches_tracked": (),
                   "attention_module.conv_temporal_attention.weight": (1, 1, 7)})
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randint(0, 100, s, generator=g) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g))
            for k, s in shapes.items()}


@pytest.mark.parametrize("wrapping", ["bare", "ddp_trainer", "mmaction"])
def test_load_authors_checkpoint(wrapping, tmp_path):
    theirs = authors_state_dict(num_classes=60)
    if wrapping == "ddp_trainer":
        saved = {"epoch": 9, "model_state_dict": {f"module.{k}": v for k, v in theirs.items()},
                 "optimizer_state_dict": {}}
    elif wrapping == "mmaction":
        saved = {"meta": {}, "state_dict": theirs}
    else:
        saved = theirs
    path = tmp_path / "epam.pth"
    torch.save(saved, path)
    model = load_authors_checkpoint(EPAMNet(num_classes=60), path)
    ours = model.state_dict()
    assert torch.equal(ours["attention_module.spatial_conv.weight"], theirs["attention_module.spatial.conv.weight"])
    assert torch.equal(ours["attention_module.temporal_conv.weight"],
                       theirs["attention_module.conv_temporal_attention.weight"])
    assert torch.equal(ours["pose_backbone.layer2.4.conv2.conv.weight"], theirs["pose_backbone.layer2.4.conv2.conv.weight"])
    assert torch.equal(ours["rgb_backbone.layer4.0.se_module.fc2.bias"], theirs["rgb_backbone.layer4.0.se_module.fc2.bias"])
    assert len(ours) == len(theirs)


def _assert_loaded(model, theirs):
    ours = model.state_dict()
    for key in ("rgb_cls_head.fc_cls.weight", "pose_backbone.conv5.bn.running_var"):
        assert torch.equal(ours[key], theirs[key])


def test_authors_checkpoint_from_file_objects(tmp_path):
    theirs = authors_state_dict(num_classes=60)
    buffer = io.BytesIO()
    torch.save({"epoch": 9, "model_state_dict": theirs}, buffer)
    buffer.seek(0)
    _assert_loaded(load_authors_checkpoint(EPAMNet(num_classes=60), buffer), theirs)
    path = tmp_path / "epam.pth"
    path.write_bytes(buffer.getvalue())
    with open(path, "rb") as f:
        _assert_loaded(load_authors_checkpoint(EPAMNet(num_classes=60), f), theirs)
    _assert_loaded(load_authors_checkpoint(EPAMNet(num_classes=60), str(path)), theirs)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_unreadable_checkpoint_names_the_file(damage, tmp_path):
    buffer = io.BytesIO()
    torch.save(authors_state_dict(num_classes=60), buffer)
    data = {"garbage": b"this is not a checkpoint" * 40, "truncated": buffer.getvalue()[:5000], "empty": b""}[damage]
    path = tmp_path / f"{damage}.pth"
    path.write_bytes(data)
    with raises_naming(CheckpointError, path):
        load_authors_checkpoint(EPAMNet(num_classes=60), path)
    with raises_naming(CheckpointError, "BytesIO"):
        load_authors_checkpoint(EPAMNet(num_classes=60), io.BytesIO(data))


def test_missing_checkpoint_file_names_it(tmp_path):
    with pytest.raises(CheckpointNotFound, match="nowhere.pth"):
        load_authors_checkpoint(EPAMNet(num_classes=60), tmp_path / "nowhere.pth")


def test_checkpoint_of_another_type_is_explained():
    with raises_naming(TypeError, "list"):
        load_authors_checkpoint(EPAMNet(num_classes=60), [1, 2])
    buffer = io.BytesIO()
    torch.save([torch.zeros(1)], buffer)
    buffer.seek(0)
    with raises_naming(CheckpointError, "list"):
        load_authors_checkpoint(EPAMNet(num_classes=60), buffer)


class _CreatesAFile:
    """Unpickling this runs open(marker, "w"): what a malicious checkpoint could do with any callable."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickled_code_in_a_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": authors_state_dict(num_classes=60), "hook": _CreatesAFile(marker)}, path)
    with raises_naming(CheckpointError, path):
        load_authors_checkpoint(EPAMNet(num_classes=60), path)
    with raises_naming(CheckpointError, "BytesIO"):
        load_authors_checkpoint(EPAMNet(num_classes=60), io.BytesIO(path.read_bytes()))
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler does create the file.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_authors_checkpoint_with_other_classes_is_refused(tmp_path):
    path = tmp_path / "ntu60.pth"
    torch.save(authors_state_dict(num_classes=60), path)
    with raises_naming(CheckpointError, path, 60, 120):
        load_authors_checkpoint(EPAMNet(num_classes=120), path)
    with raises_naming(CheckpointError, 120, 60):
        load_authors_checkpoint(EPAMNet(num_classes=60), authors_state_dict(num_classes=120))


def test_authors_checkpoint_with_other_shapes_lists_them():
    state = authors_state_dict(num_classes=60)
    state["pose_backbone.conv1_s.conv.weight"] = torch.randn(24, 25, 1, 3, 3)  # NTU's 25 joints, not COCO's 17
    with raises_naming(CheckpointError, "pose_backbone.conv1_s.conv.weight", (24, 25, 1, 3, 3), (24, 17, 1, 3, 3)):
        load_authors_checkpoint(EPAMNet(num_classes=60), state)


def test_authors_checkpoint_missing_keys_are_listed(tmp_path):
    state = authors_state_dict(num_classes=60)
    del state["attention_module.spatial.bn.weight"]
    with raises_naming(CheckpointError, "attention_module.spatial_bn.weight"):
        load_authors_checkpoint(EPAMNet(num_classes=60), state)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with raises_naming(CheckpointError, path, "attention_module.spatial_bn.weight"):
        load_authors_checkpoint(EPAMNet(num_classes=60), path)


def test_conversion_round_trip():
    theirs = authors_state_dict(num_classes=60)
    converted = convert_authors_state_dict({f"module.{k}": v for k, v in theirs.items()})
    assert set(converted) == set(EPAMNet(num_classes=60).state_dict())


# ---- compile, bad input -------------------------------------------------------------------------------------------------

def test_compile_fullgraph_backbone():
    net = small_backbone()
    x = torch.randn(1, 3, 4, 16, 16, requires_grad=True)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), net(x))
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(net, fullgraph=True, backend="aot_eager")(x), net(x))


def test_compile_fullgraph_whole_model():
    torch.manual_seed(0)
    model = randomize_batch_norm(EPAMNet(num_classes=4)).eval()
    imgs, heatmaps = torch.randn(1, 3, 2, 32, 32), torch.rand(1, 17, 6, 8, 8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for got, want in zip(compiled(imgs, heatmaps), model(imgs, heatmaps)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("imgs,heatmaps,message", [
    ((1, 3, 16, 224, 224), (1, 17, 40, 56, 56), "pose frames T_p = 40 must be a multiple of the RGB frames T = 16"),
    ((1, 3, 16, 112, 112), (1, 17, 48, 56, 56), "the streams end at different sizes"),
    ((1, 4, 2, 32, 32), (1, 17, 6, 8, 8), r"expected input \(N, 3, T, H, W\)"),
    ((1, 3, 2, 32, 32), (1, 25, 6, 8, 8), r"expected input \(N, 17, T, H, W\)"),
    ((2, 3, 2, 32, 32), (1, 17, 6, 8, 8), "with the same N"),
])
def test_bad_input_is_explained(imgs, heatmaps, message):
    with pytest.raises(ValueError, match=message):
        EPAMNet(num_classes=3)(torch.randn(imgs), torch.rand(heatmaps))


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes must be an int >= 1, got 0"):
        EPAMNet(num_classes=0)


def test_forward_keypoints_renders_as_the_data_pipeline():
    """EPAMNet.forward_keypoints renders raw keypoints exactly as epamx.data.BatchTransform does for training (the
    authors' MMCompact clips the persons' box to the image), so a model sees the same heatmaps either way."""
    from epamx.data import BatchTransform, DataConfig

    torch.manual_seed(5)
    model = EPAMNet(num_classes=4, heatmap_size=16)
    kp = torch.rand(2, 1, 6, 17, 2) * torch.tensor([90.0, 70.0]) - 10  # some joints outside the 80 x 60 image
    scores = torch.rand(2, 1, 6, 17)
    batch = {"keypoint": kp, "keypoint_score": scores, "img_shape": torch.tensor([[60, 80]] * 2),
             "flip": torch.tensor([False, True]), "label": torch.zeros(2, dtype=torch.long)}
    _, expected, _ = BatchTransform(DataConfig(heatmap_size=16), ("pose",))(batch, torch.device("cpu"))
    got = model.pose_renderer(kp, scores, (60, 80), torch.tensor([False, True]))
    torch.testing.assert_close(got, expected)
