"""EPAM-Net inference on one clip (batch 1: 16 RGB frames at 224x224, 48 heatmap frames of 17 joints at 56x56),
fused ops against the plain-PyTorch reference path in the same run, model and clip contiguous and (as a CPU
runs it best) channels_last_3d; the peak memory of inference with the in-place shift against the out-of-place one;
a training step.

More implementations of a case are more entries of its dict (e.g. "authors": the authors' model on the same
clip), each timed interleaved with the others; baseline= names the row the `vs baseline` column divides by, and
ratios=[("fused", "authors")] adds further same-run ratios.

Goal: CPU (2 threads) <= 0.30 s per clip (the authors' model measures about 0.44 s here)."""
import pytest
import torch

from epamx.models import EPAMNet

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}


def _clip(device, layout, batch=1):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, 3, 16, 224, 224, generator=g).to(device)
    heatmaps = torch.rand(batch, 17, 48, 56, 56, generator=g).to(device)
    return imgs.contiguous(memory_format=layout), heatmaps.contiguous(memory_format=layout)


def _model(device, layout, **kwargs):
    torch.manual_seed(0)
    return EPAMNet(num_classes=60, **kwargs).eval().to(device).to(memory_format=layout)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_epamnet_inference_latency(compare, device, layout):
    """Model and clip both in `layout`; the fused and reference models have the same weights."""
    imgs, heatmaps = _clip(device, LAYOUTS[layout])

    def infer(model):
        def run():
            with torch.no_grad():
                return model(imgs, heatmaps)
        return run

    impls = {impl: infer(_model(device, LAYOUTS[layout], fused=impl == "fused")) for impl in ("reference", "fused")}
    compare("EPAMNet inference", f"1 clip, 60 classes, {layout}", impls, device=device, cuda_calls=5)


def _inference_call(shift: str, batch: int):
    """For peak_memory: EPAM-Net inference on `batch` clips, the temporal shift in place or out of place."""
    model = _model("cpu", torch.contiguous_format)
    for m in model.modules():
        if hasattr(m, "inplace_shift"):
            m.inplace_shift = shift == "inplace"
    imgs, heatmaps = _clip("cpu", torch.contiguous_format, batch)

    def run():
        with torch.no_grad():
            model(imgs, heatmaps)
    return run


def test_epamnet_inference_peak_memory(peak_memory, record_metric, device):
    """Peak resident memory of one forward pass above the resident memory before it, 4 clips: at batch 1 the
    difference is within the resident-memory noise of malloc's retained heap."""
    if device.type != "cpu":
        pytest.skip("peak resident memory is measured for CPU inference")
    peaks = {}
    for mode in ("inplace", "out_of_place"):
        peaks[mode] = peak_memory(_inference_call, mode, 4, device=device).above_start / 2**20
        record_metric("EPAMNet inference peak memory above start (MiB)", f"4 clips, shift {mode}", f"{peaks[mode]:.0f}")
    saved = peaks["out_of_place"] - peaks["inplace"]
    record_metric("EPAMNet inference peak memory saved by the in-place shift", "4 clips",
                  f"{saved:.0f} MiB ({saved / peaks['out_of_place']:.0%})")


def test_epamnet_training_step(compare, device):
    """Forward + backward + SGD step: batch 12 with bfloat16 autocast on a GPU (goal: fused >= 1.3x the
    reference); batch 2 in float32 on a CPU, where a step of 12 clips takes tens of seconds."""
    cuda = device.type == "cuda"
    batch = 12 if cuda else 2
    imgs = torch.randn(batch, 3, 16, 224, 224, device=device)
    heatmaps = torch.rand(batch, 17, 48, 56, 56, device=device)
    labels = torch.randint(0, 60, (batch,), device=device)

    def training_step(fused):
        torch.manual_seed(0)
        model = EPAMNet(num_classes=60, fused=fused).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=3e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                rgb_logits, pose_logits = model(imgs, heatmaps)
                loss = torch.nn.functional.cross_entropy(rgb_logits, labels) + \
                    torch.nn.functional.cross_entropy(pose_logits, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 40.0)
            optimizer.step()
        return step

    compare("EPAMNet training step", f"batch {batch}{', bf16 autocast' if cuda else ', fp32'}",
            {"reference": training_step(False), "fused": training_step(True)}, device=device, cuda_calls=2)
