"""Training throughput: clips/s of one full training step (forward, the streams' cross-entropy, backward, gradient
clipping to norm 40, SGD with momentum and weight decay), as epamx.train.epoch takes it, at the sizes of the
embedded config (epamx/configs/embedded.toml: batch 16, RGB 4 x 64 x 64, heatmaps of 17 joints 12 x 16 x 16) for
each stage's model: the pose stream, the RGB stream and EPAM-Net. Each on the fused epamx ops against the same model
with ``fused=False`` (the plain-PyTorch reference ops), in the same run; on a CPU both in channels_last_3d, as the
loop trains there (model.channels_last = "auto"); and, a case of its own, EPAM-Net's fused step in channels_last_3d
against contiguous. On CUDA the loop's defaults too: contiguous, bfloat16 autocast.

A step takes tenths of a second on a CPU, so a case runs the fewest rounds allowed (--bench-min-rounds per repeat).
On a CPU that other processes keep busy, 2-thread OpenMP regions wait for their second thread (see bench_data.py);
--bench-threads 1 measures without that."""
import pytest
import torch
import torch.nn.functional as F

from epamx.config import load_config
from epamx.models.streams import build_model, stream_logits

CONFIG = load_config("embedded")
NUM_CLASSES = 12  # the embedded dataset's
MODELS = {"pose": "pose stream", "rgb": "RGB stream", "epamnet": "EPAM-Net"}


def _case(device) -> str:
    d, batch = CONFIG.data, CONFIG.train.batch_size
    rgb = f"RGB {d.clip_len // d.rgb_every}x{d.frame_size}^2"
    pose = f"heatmaps {d.clip_len}x{d.heatmap_size}^2"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    return f"batch {batch}, {rgb}, {pose}, {precision}"


def _inputs(device, channels_last: bool):
    d, batch = CONFIG.data, CONFIG.train.batch_size
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, 3, d.clip_len // d.rgb_every, d.frame_size, d.frame_size, generator=g)
    heatmaps = torch.rand(batch, CONFIG.model.pose_channels, d.clip_len, d.heatmap_size, d.heatmap_size, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    return (imgs.to(device).contiguous(memory_format=layout), heatmaps.to(device).contiguous(memory_format=layout),
            labels.to(device))


def _training_step(device, mode, fused: bool, channels_last: bool):
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = build_model(mode, NUM_CLASSES, CONFIG.model.pose_channels, fused, CONFIG.model.dropout)
    model = model.to(device).train()
    model.memory_format = "channels_last_3d" if channels_last else "contiguous"
    model = model.to(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    optim = CONFIG.optim
    lr = CONFIG.stage(mode).lr_per_16 * CONFIG.stage(mode).batch_size / 16
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                                nesterov=optim.nesterov)
    params = [p for p in model.parameters() if p.requires_grad]
    imgs, heatmaps, labels = _inputs(device, channels_last)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = stream_logits(model, imgs, heatmaps)
        loss = sum(F.cross_entropy(value.float(), labels) for value in logits.values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, optim.clip_grad)
        optimizer.step()

    return step


@pytest.mark.parametrize("mode", list(MODELS))
def test_training_step(compare, record_metric, device, mode):
    """The fused ops against the reference ops, in the loop's layout for the device."""
    channels_last = device.type == "cpu"
    impls = {impl: _training_step(device, mode, impl == "fused", channels_last) for impl in ("reference", "fused")}
    layout = "channels_last_3d" if channels_last else "contiguous"
    result = compare(f"training step, {MODELS[mode]}", f"{_case(device)}, {layout}", impls, device=device,
                     cuda_calls=3)
    for impl in impls:
        clips_per_s = CONFIG.train.batch_size / result.seconds(impl)
        versus = f" ({result.ratio(impl, 'reference').median:.2f}x reference)" if impl != "reference" else ""
        record_metric("training clips/s", f"{device.type}, {MODELS[mode]}, {impl}", f"{clips_per_s:.1f}{versus}")


def test_training_step_layout(compare, record_metric, device):
    """EPAM-Net on the fused ops, channels_last_3d against contiguous (model and inputs): the layout is what this
    case compares, everything else is the same."""
    if device.type == "cuda":
        pytest.skip("the layouts are compared on a CPU (CUDA trains contiguous)")
    impls = {layout: _training_step(device, "epamnet", True, layout == "channels_last_3d")
             for layout in ("contiguous", "channels_last_3d")}
    result = compare(f"training step, {MODELS['epamnet']}, fused", _case(device), impls, device=device,
                     baseline="contiguous")
    ratio = result.ratio("channels_last_3d", "contiguous")
    record_metric("training step channels_last_3d vs contiguous", f"{device.type}, {MODELS['epamnet']}, fused",
                  f"{ratio.median:.2f}x ({ratio.low:.2f}-{ratio.high:.2f}x)")
