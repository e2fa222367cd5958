"""Fast by default: the memory-format policy of the models, the stems' frame-wise convolution, and
optimize_for_inference (batch norm folded), each against the plain contiguous model."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

from epamx.models import EPAMNet, PoseStream, RGBStream, optimize_for_inference, preferred_memory_format
from epamx.models.xshiftnet import ConvBNAct, SqueezeExcite, XShiftBlock
from test_epamnet import randomize_batch_norm
from testkit import without_onednn_bfloat16

CL = torch.channels_last_3d


def small_clip(seed=0, batch=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 4, 64, 64, generator=g, dtype=dtype),
            torch.rand(batch, 17, 12, 16, 16, generator=g, dtype=dtype))


def epamnet(memory_format="auto", seed=0, num_classes=5, dtype=torch.float32):
    torch.manual_seed(seed)
    return randomize_batch_norm(EPAMNet(num_classes, memory_format=memory_format)).to(dtype).eval()


def stem_weights(model):
    return [model.rgb_backbone.conv1_s.conv.weight, model.pose_backbone.conv1_s.conv.weight]


# ---- the memory-format policy ----------------------------------------------------------------------------------------

def test_preferred_memory_format_per_device():
    assert preferred_memory_format("cpu") == CL
    assert preferred_memory_format(torch.device("cuda", 0)) == torch.contiguous_format


def test_auto_runs_channels_last_on_cpu_with_the_same_logits():
    imgs, heatmaps = small_clip()
    plain = epamnet("contiguous")
    auto = epamnet("auto")
    assert auto.memory_format == "auto"
    with torch.no_grad():
        want = plain(imgs, heatmaps)
        got = auto(imgs, heatmaps)
    assert all(w.is_contiguous(memory_format=CL) and not w.is_contiguous() for w in stem_weights(auto))
    assert all(w.is_contiguous() for w in stem_weights(plain))
    assert imgs.is_contiguous() and heatmaps.is_contiguous()  # the caller's tensors are not converted in place
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_auto_logits_match_in_float64():
    imgs, heatmaps = small_clip(dtype=torch.float64)
    with torch.no_grad():
        want = epamnet("contiguous", dtype=torch.float64)(imgs, heatmaps)
        got = epamnet("auto", dtype=torch.float64)(imgs, heatmaps)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_contiguous_policy_converts_channels_last_weights_back():
    model = epamnet("auto").to(memory_format=CL)
    model.memory_format = "contiguous"
    with torch.no_grad():
        model(*small_clip())
    assert all(w.is_contiguous() for w in stem_weights(model))


def test_preserve_leaves_weights_and_inputs_as_given():
    model = epamnet("preserve")
    seen = []
    model.rgb_backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        model(*small_clip())
    assert seen == [True]
    assert all(w.is_contiguous() for w in stem_weights(model))


@pytest.mark.parametrize("cls,inputs", [(RGBStream, 0), (PoseStream, 1)])
def test_streams_follow_the_policy(cls, inputs):
    torch.manual_seed(0)
    plain = randomize_batch_norm(cls(5, memory_format="contiguous")).eval()
    auto = cls(5)
    auto.load_state_dict(plain.state_dict())
    auto.eval()
    x = small_clip()[inputs]
    with torch.no_grad():
        torch.testing.assert_close(auto(x), plain(x), rtol=1e-4, atol=1e-5)
    backbone = auto.rgb_backbone if cls is RGBStream else auto.pose_backbone
    assert backbone.conv1_s.conv.weight.is_contiguous(memory_format=CL)


def test_training_in_the_auto_format_gives_the_same_gradients():
    imgs, heatmaps = small_clip(dtype=torch.float64)
    grads = {}
    for fmt in ("contiguous", "auto"):
        model = epamnet(fmt, dtype=torch.float64).train()
        rgb, pose = model(imgs, heatmaps)
        (rgb.square().sum() + pose.square().sum()).backward()
        grads[fmt] = {n: p.grad for n, p in model.named_parameters()}
    for name, g in grads["auto"].items():
        torch.testing.assert_close(g, grads["contiguous"][name], rtol=1e-7, atol=1e-9, msg=name)


def test_bad_memory_format_is_explained():
    with pytest.raises(ValueError, match="EPAMNet: memory_format must be one of auto, channels_last_3d"):
        EPAMNet(5, memory_format="channels_last")
    with pytest.raises(ValueError, match="RGBStream: memory_format"):
        RGBStream(5, memory_format=torch.channels_last_3d)


# ---- the frame-wise convolutions (stems, blocks' depthwise convolutions) ------------------------------------------------

@pytest.mark.parametrize("channels,groups", [((3, 8), 1), ((8, 8), 8)], ids=["stem", "depthwise"])
@pytest.mark.parametrize("stride", [1, 2])
def test_frame_wise_convolution_equals_conv3d(stride, channels, groups):
    torch.manual_seed(0)
    layer = randomize_batch_norm(ConvBNAct(*channels, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1),
                                           groups=groups, frame_wise=True)).double().train()
    reference = copy.deepcopy(layer)
    reference.frame_wise = False
    layer = layer.to(memory_format=CL)
    x = torch.randn(2, channels[0], 5, 13, 11, dtype=torch.float64)
    a = x.contiguous(memory_format=CL).requires_grad_(True)
    b = x.clone().requires_grad_(True)
    out_a, out_b = layer(a), reference(b)
    assert out_a.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out_a, out_b)
    weight = torch.randn_like(out_b)
    (out_a * weight).sum().backward()
    (out_b * weight).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(layer.conv.weight.grad, reference.conv.weight.grad)
    assert torch.autograd.gradcheck(lambda t: layer.eval()(t), (a[:1, :, :2, :5, :4].detach().requires_grad_(),))


def test_frame_wise_needs_a_single_frame_kernel():
    assert not ConvBNAct(3, 8, (3, 3, 3), padding=1, frame_wise=True).frame_wise
    assert ConvBNAct(3, 8, (1, 3, 3), padding=(0, 1, 1), frame_wise=True).frame_wise


# ---- optimize_for_inference ------------------------------------------------------------------------------------------

def test_optimized_model_gives_the_same_logits():
    model = epamnet("contiguous", num_classes=7)
    before = copy.deepcopy(model.state_dict())
    fast = optimize_for_inference(model)
    imgs, heatmaps = small_clip(seed=1)
    with torch.no_grad():
        want = model(imgs, heatmaps)
        got = fast(imgs, heatmaps)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in fast.modules())
    assert not any(p.requires_grad for p in fast.parameters())
    assert not fast.training
    assert fast.rgb_backbone.conv1_s.conv.weight.is_contiguous(memory_format=CL)
    # the original is untouched: its batch norms, weights and memory format
    assert any(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.rgb_backbone.conv1_s.conv.weight.is_contiguous()


def test_optimized_under_inference_mode_and_copied():
    """Made under torch.inference_mode (its weights inference tensors), deep-copied and loaded with other weights,
    saved whole and loaded, the copy gives the model's logits: its convolutions' packed weights (epamx.nn.conv_act.pack_weight) are kept
    outside it and follow the weights."""
    model = epamnet(num_classes=7)
    imgs, heatmaps = small_clip(seed=2)
    with torch.no_grad():
        want = model(imgs, heatmaps)
    with torch.inference_mode():
        fast = optimize_for_inference(model)
        got = fast(imgs, heatmaps)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    fast = optimize_for_inference(model)
    twin = copy.deepcopy(fast)
    other = epamnet(num_classes=7, seed=5)
    twin.load_state_dict(optimize_for_inference(other).state_dict())
    with torch.no_grad():
        for g, w in zip(twin(imgs, heatmaps), other(imgs, heatmaps)):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        for g, w in zip(fast(imgs, heatmaps), want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    buffer = io.BytesIO()  # saved whole and loaded back
    torch.save(fast, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        for g, w in zip(loaded(imgs, heatmaps), want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_optimized_model_in_float64_is_exact_to_rounding():
    model = epamnet("contiguous", dtype=torch.float64)
    imgs, heatmaps = small_clip(dtype=torch.float64)
    with torch.no_grad():
        for g, w in zip(optimize_for_inference(model)(imgs, heatmaps), model(imgs, heatmaps)):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_optimized_model_without_no_grad_and_with_autograd_inputs():
    """The copy's parameters need no gradients; inputs that require them still get correct ones."""
    model = epamnet("contiguous")
    fast = optimize_for_inference(model)
    imgs, heatmaps = small_clip()
    a = imgs.clone().requires_grad_(True)
    rgb, _ = fast(a, heatmaps)
    rgb.sum().backward()
    b = imgs.clone().requires_grad_(True)
    model(b, heatmaps)[0].sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls,inputs", [(RGBStream, 0), (PoseStream, 1)])
def test_optimized_streams(cls, inputs):
    torch.manual_seed(0)
    model = randomize_batch_norm(cls(5)).eval()
    x = small_clip()[inputs]
    with torch.no_grad():
        torch.testing.assert_close(optimize_for_inference(model, "contiguous")(x), model(x), rtol=1e-4, atol=1e-4)


def test_optimize_for_inference_refuses_other_modules_and_formats():
    with pytest.raises(TypeError, match="expected an EPAMNet, RGBStream or PoseStream, got Linear"):
        optimize_for_inference(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="optimize_for_inference: memory_format must be one of"):
        optimize_for_inference(RGBStream(3), memory_format="nhwc")


def test_optimized_model_reuses_activation_memory_with_identical_logits():
    from epamx.memory import cpu_cache_stats, empty_cpu_cache
    model = epamnet(num_classes=7)
    g = torch.Generator().manual_seed(3)
    imgs, heatmaps = torch.randn(1, 3, 8, 128, 128, generator=g), torch.rand(1, 17, 24, 32, 32, generator=g)
    plain = optimize_for_inference(model, cache_memory=False)
    cached = optimize_for_inference(model)
    empty_cpu_cache()
    with torch.no_grad():
        want = plain(imgs, heatmaps)
        before = cpu_cache_stats()
        plain(imgs, heatmaps)
        assert cpu_cache_stats()["misses"] == before["misses"]  # cache_memory=False: untouched
        first = cached(imgs, heatmaps)
        after_first = cpu_cache_stats()
        second = cached(imgs, heatmaps)
        after_second = cpu_cache_stats()
    assert not after_second["active"]
    assert after_first["misses"] > before["misses"]
    assert after_second["misses"] == after_first["misses"]  # the second forward allocates nothing new
    assert after_second["hits"] > after_first["hits"]
    for out in (first, second):
        for g_, w in zip(out, want):
            assert torch.equal(g_, w)


def test_a_failing_forward_closes_its_memory_scope():
    from epamx.memory import cpu_cache_stats
    fast = optimize_for_inference(epamnet())
    imgs, heatmaps = small_clip()
    with pytest.raises(ValueError, match="must be a multiple of the RGB frames"), torch.no_grad():
        fast(imgs[:, :, :1].expand(-1, -1, 5, -1, -1), heatmaps)
    assert cpu_cache_stats()["depth"] == 0


def test_optimized_model_compiles():
    model = epamnet("contiguous")
    fast = optimize_for_inference(model)
    imgs, heatmaps = small_clip(batch=1)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for g, w in zip(compiled(imgs, heatmaps), model(imgs, heatmaps)):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


# ---- bfloat16 inference ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfloat16_logits_are_close_to_float32_with_the_same_top1(seed):
    model = epamnet("auto", seed=seed, num_classes=12)
    imgs, heatmaps = small_clip(seed=seed, batch=4)
    with torch.no_grad():
        want = optimize_for_inference(model)(imgs, heatmaps)
        got = optimize_for_inference(model, dtype=torch.bfloat16)(imgs, heatmaps)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert (g - w).abs().max() <= 5e-2
        assert torch.equal(g.argmax(1), w.argmax(1))
    assert torch.equal(sum(got).argmax(1), sum(want).argmax(1))


def test_bfloat16_where_onednn_refuses_bfloat16():
    """On a CPU where PyTorch refuses oneDNN's bfloat16 convolutions (an AVX2-only one; this one made to look like
    it), the bfloat16 copy runs them through oneDNN's float32 ones (epamx.nn.conv_act): logits close to float32's,
    the same top-1, and close to those of the bfloat16 path where the CPU has it."""
    model = epamnet("auto", seed=1, num_classes=12)
    imgs, heatmaps = small_clip(seed=1, batch=4)
    with torch.no_grad():
        want = optimize_for_inference(model)(imgs, heatmaps)
        here = optimize_for_inference(model, dtype=torch.bfloat16)(imgs, heatmaps)
        with without_onednn_bfloat16() as conv_act_module:
            fast = optimize_for_inference(model, dtype=torch.bfloat16)
            packed = [entry[1] for entry in conv_act_module._PACKED.values()]
            got = fast(imgs, heatmaps)
    assert packed and all(p.dtype == torch.float32 for p in packed)
    for g, w, h in zip(got, want, here):
        assert g.dtype == torch.float32
        assert (g - w).abs().max() <= 5e-2 and (g - h).abs().max() <= 5e-2
        assert torch.equal(g.argmax(1), w.argmax(1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("memory_format,cache_memory", [("auto", True), ("auto", False), ("contiguous", True)])
def test_folded_block_path_gives_the_general_paths_bits(dtype, memory_format, cache_memory):
    """The inference copy's blocks take XShiftBlock._forward_folded; with it switched off they take the general
    forward, which must make the same calls: the same logits, bit for bit (blocks with and without squeeze-and-
    excitation, with a downsampling convolution, the shift as a copy or in place, frame-wise or 3D depthwise)."""
    model = epamnet(memory_format)
    fast = optimize_for_inference(model, memory_format, dtype=dtype, cache_memory=cache_memory)
    blocks = [m for m in fast.modules() if isinstance(m, XShiftBlock)]
    assert blocks and all(b.folded for b in blocks)
    imgs, heatmaps = small_clip(batch=2)
    first = blocks[0].conv1.conv
    with torch.no_grad():
        assert blocks[0]._folded_path_applies(torch.zeros(1, first.in_channels, 2, 4, 4, dtype=first.weight.dtype))
        folded = fast(imgs, heatmaps)
        for b in blocks:
            b.folded = False
        general = fast(imgs, heatmaps)
    for f, g in zip(folded, general):
        assert torch.equal(f, g)
    assert not XShiftBlock.folded and not any(m.folded for m in model.modules() if isinstance(m, XShiftBlock))


def test_bfloat16_copy_holds_bfloat16_weights_and_leaves_the_model_alone():
    """All weights in bfloat16 but the squeeze-and-excitation MLPs' (float32, unrounded: they read float32 sums
    and give the float32 gate)."""
    model = epamnet("contiguous")
    fast = optimize_for_inference(model, "contiguous", dtype="bfloat16")
    squeeze = {name for name, module in fast.named_modules() if isinstance(module, SqueezeExcite)}
    assert squeeze
    original = dict(model.named_parameters())
    for name, p in fast.named_parameters():
        if name.rsplit(".", 2)[0] in squeeze:
            assert p.dtype == torch.float32 and torch.equal(p, original[name]), name
        else:
            assert p.dtype == torch.bfloat16, name
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("cls,inputs", [(RGBStream, 0), (PoseStream, 1)])
def test_bfloat16_streams(cls, inputs):
    torch.manual_seed(0)
    model = randomize_batch_norm(cls(5)).eval()
    x = small_clip()[inputs]
    with torch.no_grad():
        got = optimize_for_inference(model, dtype=torch.bfloat16)(x)
        want = model(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=5e-2)


def test_bfloat16_warns_on_a_cpu_without_bfloat16_instructions(monkeypatch):
    import epamx.models.optimize as optimize

    monkeypatch.setattr(optimize, "cpu_has_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="no bfloat16 instructions"):
        optimize_for_inference(RGBStream(3), dtype=torch.bfloat16)
    monkeypatch.setattr(optimize, "cpu_has_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimize_for_inference(RGBStream(3), dtype=torch.bfloat16)
        optimize_for_inference(RGBStream(3))


def test_bad_dtype_is_explained():
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.bfloat16"):
        optimize_for_inference(RGBStream(3), dtype=torch.float16)
    with pytest.raises(ValueError, match="dtype must be"):
        optimize_for_inference(RGBStream(3), dtype="fp8")


def test_bfloat16_model_compiles():
    model = epamnet("contiguous")
    fast = optimize_for_inference(model, dtype=torch.bfloat16)
    imgs, heatmaps = small_clip(batch=1)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for g, w in zip(compiled(imgs, heatmaps), fast(imgs, heatmaps)):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2)
