"""Training throughput: clips/s of one full training step (forward, the streams' cross-entropy, backward, gradient
clipping to norm 40, SGD with momentum and weight decay), as epamx.train.loop takes it, at the sizes of the
embedded config (epamx/configs/embedded.toml: batch 16, RGB 4 x 64 x 64, heatmaps of 17 joints 12 x 16 x 16) for
each stage's model: the pose stream, the RGB stream and EPAM-Net. Each on the fused epamx ops against the same model
with ``fused=False`` (the plain-PyTorch reference ops), in the same run; on a CPU both in channels_last_3d, as the
loop trains there (model.channels_last = "auto"), and EPAM-Net also in the contiguous layout. On CUDA the loop's
defaults too: contiguous, bfloat16 autocast.

A step takes tenths of a second on a CPU, so each row is a few rounds (min 3), after one warm-up step. On a CPU
that other processes keep busy, 2-thread OpenMP regions wait for their second thread (see bench_data.py);
--bench-threads 1 measures without that."""
import pytest
import torch
import torch.nn.functional as F

from epamx.models.streams import build_model, stream_logits
from epamx.train import load_config

CONFIG = load_config("embedded")
NUM_CLASSES = 12  # the embedded dataset's
MODELS = {"pose": "pose stream", "rgb": "RGB stream", "fused": "EPAM-Net"}
IMPLS = {"reference": dict(fused=False, contiguous=False), "fused": dict(fused=True, contiguous=False),
         "fused, contiguous": dict(fused=True, contiguous=True)}
_CLIPS_PER_S: dict = {}


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


@pytest.mark.benchmark(min_rounds=3, max_time=0.5, warmup=False)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", list(MODELS))
def test_training_step(measure, benchmark, record_metric, device, mode, impl):
    spec = IMPLS[impl]
    cuda = device.type == "cuda"
    if spec["contiguous"] and (mode != "fused" or cuda):
        pytest.skip("the layouts are compared for EPAM-Net on a CPU (CUDA trains contiguous)")
    channels_last = not cuda and not spec["contiguous"]
    torch.manual_seed(0)
    model = build_model(mode, NUM_CLASSES, CONFIG.model.pose_channels, spec["fused"], CONFIG.model.dropout)
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optim = CONFIG.optim
    lr = optim.stage_lr_per_16(mode) * CONFIG.train.batch_size / 16
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

    step()
    case = _case(device)
    measure(f"training step, {MODELS[mode]}", case, impl, step, 0, device, cuda_calls=3)
    seconds = benchmark.stats.stats.median / benchmark.extra_info["calls_per_round"]
    clips_per_s = CONFIG.train.batch_size / seconds
    _CLIPS_PER_S[(device.type, mode, impl)] = clips_per_s
    reference = _CLIPS_PER_S.get((device.type, mode, "reference"))
    versus = f" ({clips_per_s / reference:.2f}x reference)" if reference and impl != "reference" else ""
    record_metric("training clips/s", f"{device.type}, {MODELS[mode]}, {impl}", f"{clips_per_s:.1f}{versus}")
    channels_last_rate = _CLIPS_PER_S.get((device.type, mode, "fused"))
    if spec["contiguous"] and channels_last_rate:
        record_metric("training step channels_last_3d vs contiguous", f"{device.type}, {MODELS[mode]}, fused",
                      f"{channels_last_rate / clips_per_s:.2f}x")
