"""The single-stream models: their state dicts are EPAM-Net's parts, init_from moves weights between the three
models (and from the authors' checkpoints), with errors naming the file and the mismatch."""
import pytest
import torch

from epamx.models import EPAMNet, PoseStream, RGBStream, build_model, init_from, stream_logits
from epamx.models.streams import modalities, model_mode
from epamx.train.checkpoint import save_checkpoint

IMGS = (2, 3, 4, 32, 32)
HEATMAPS = (2, 17, 12, 8, 8)


def randomize(model, seed):
    """Random batch-norm statistics and affine parameters (the authors' init zeroes some), small enough that
    activations stay finite."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.weight.data = torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
            m.running_mean = torch.randn(m.running_mean.shape, generator=g) * 0.1
            m.running_var = torch.rand(m.running_var.shape, generator=g) + 0.5
    return model.eval()


def test_stream_state_dicts_are_parts_of_epamnets():
    fused = EPAMNet(5).state_dict()
    for stream, prefixes in ((RGBStream(5), ("rgb_backbone.", "rgb_cls_head.")),
                             (PoseStream(5), ("pose_backbone.", "pose_cls_head."))):
        own = stream.state_dict()
        assert own and all(k.startswith(prefixes) for k in own)
        assert {k: v.shape for k, v in own.items()} == {k: v.shape for k, v in fused.items() if k.startswith(prefixes)}
    covered = set(RGBStream(5).state_dict()) | set(PoseStream(5).state_dict())
    assert {k.split(".")[0] for k in set(fused) - covered} == {"attention_module"}


def test_stage_checkpoints_initialise_epamnet(tmp_path):
    rgb, pose = randomize(RGBStream(5), 1), randomize(PoseStream(5), 2)
    rgb_path = save_checkpoint({"meta": {"mode": "rgb"}, "model": rgb.state_dict()}, tmp_path / "rgb.pt")
    pose_path = save_checkpoint({"meta": {"mode": "pose"}, "model": pose.state_dict()}, tmp_path / "pose.pt")
    model = EPAMNet(5).eval()
    attention = {k: v.clone() for k, v in model.attention_module.state_dict().items()}
    loaded = init_from(model, [pose_path, rgb_path])
    assert loaded == {str(pose_path): ["pose_backbone", "pose_cls_head"],
                      str(rgb_path): ["rgb_backbone", "rgb_cls_head"]}
    imgs, heatmaps = torch.randn(IMGS), torch.rand(HEATMAPS)
    with torch.no_grad():
        torch.testing.assert_close(model.rgb_backbone(imgs), rgb.rgb_backbone(imgs), rtol=0, atol=0)
        torch.testing.assert_close(model(imgs, heatmaps)[1], pose(heatmaps), rtol=0, atol=0)
    for k, v in model.attention_module.state_dict().items():
        assert torch.equal(v, attention[k])  # untouched: the stage checkpoints have no attention block


def test_a_stream_takes_its_part_of_an_epamnet_checkpoint(tmp_path):
    fused = randomize(EPAMNet(5), 3)
    pose = init_from(PoseStream(5), [fused.state_dict()])
    assert pose == {"<state dict>": ["pose_backbone", "pose_cls_head"]}


def test_authors_checkpoint_through_init_from(tmp_path):
    source = randomize(EPAMNet(5), 4)
    renamed = {"module." + k.replace("attention_module.spatial_conv.", "attention_module.spatial.conv.")
               .replace("attention_module.spatial_bn.", "attention_module.spatial.bn.")
               .replace("attention_module.temporal_conv.", "attention_module.conv_temporal_attention."): v
               for k, v in source.state_dict().items()}
    path = tmp_path / "authors.pth"
    torch.save({"epoch": 10, "model_state_dict": renamed, "optimizer_state_dict": {}}, path)
    model = EPAMNet(5)
    init_from(model, path)
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_errors_name_the_file_and_the_mismatch(tmp_path):
    path = save_checkpoint({"model": PoseStream(60).state_dict()}, tmp_path / "pose60.pt")
    with pytest.raises(ValueError) as err:
        init_from(EPAMNet(120), [path])
    assert str(path) in str(err.value) and "checkpoint has 60 classes, model 120" in str(err.value)

    path = save_checkpoint({"model": PoseStream(5, pose_channels=34).state_dict()}, tmp_path / "limbs.pt")
    with pytest.raises(ValueError, match="takes 34 heatmap channels, model 17"):
        init_from(PoseStream(5), [path])

    rgb = save_checkpoint({"model": RGBStream(5).state_dict()}, tmp_path / "rgb.pt")
    with pytest.raises(ValueError, match=f"{rgb}: holds none of the parts of this pose model"):
        init_from(PoseStream(5), [rgb])
    pose = save_checkpoint({"model": PoseStream(5).state_dict()}, tmp_path / "pose.pt")
    assert init_from(PoseStream(5), [rgb, pose]) == {str(rgb): [], str(pose): ["pose_backbone", "pose_cls_head"]}

    partial = {k: v for k, v in PoseStream(5).state_dict().items() if "layer3" not in k}
    with pytest.raises(ValueError, match="its pose_backbone differs from the model's: missing"):
        init_from(PoseStream(5), [partial])
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        init_from(PoseStream(5), [tmp_path / "nope.pt"])


def test_build_model_and_stream_logits():
    imgs, heatmaps = torch.randn(IMGS), torch.rand(HEATMAPS)
    for mode, cls, keys in (("rgb", RGBStream, ["rgb"]), ("pose", PoseStream, ["pose"]),
                            ("epamnet", EPAMNet, ["rgb", "pose"])):
        model = build_model(mode, 5, fused=False, dropout=0.0).eval()
        assert isinstance(model, cls) and model_mode(model) == mode and not model.fused
        with torch.no_grad():
            out = stream_logits(model, imgs if "rgb" in modalities(mode) else None,
                                heatmaps if "pose" in modalities(mode) else None)
        assert list(out) == keys and all(v.shape == (2, 5) for v in out.values())
    with pytest.raises(ValueError, match="mode must be one of rgb, pose, epamnet"):
        build_model("all", 5)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        RGBStream(0)


def test_streams_fused_and_reference_paths_agree():
    torch.manual_seed(0)
    model = PoseStream(5).eval()
    heatmaps = torch.rand(HEATMAPS)
    with torch.no_grad():
        fused = model(heatmaps)
        model.fused = False
        reference = model(heatmaps)
    torch.testing.assert_close(fused, reference)
