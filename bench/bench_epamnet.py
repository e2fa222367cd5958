"""EPAM-Net inference on one clip (batch 1: 16 RGB frames at 224x224, 48 heatmap frames of 17 joints at 56x56),
fused ops against the plain-PyTorch reference path in the same run; the peak memory of inference with the
in-place shift against the out-of-place one; a training step.

Goal: CPU (2 threads) <= 0.30 s per clip (the authors' model measures about 0.44 s here)."""
import json
import subprocess
import sys

import pytest
import torch

from epamx.models import EPAMNet

IMPLS = {
    "reference": dict(fused=False, channels_last=False),
    "fused": dict(fused=True, channels_last=False),
    "fused_channels_last": dict(fused=True, channels_last=True),
}


def _clip(device, channels_last):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(1, 3, 16, 224, 224, generator=g).to(device)
    heatmaps = torch.rand(1, 17, 48, 56, 56, generator=g).to(device)
    if channels_last:
        imgs = imgs.contiguous(memory_format=torch.channels_last_3d)
        heatmaps = heatmaps.contiguous(memory_format=torch.channels_last_3d)
    return imgs, heatmaps


@pytest.mark.parametrize("impl", list(IMPLS))
def test_epamnet_inference_latency(measure, device, impl):
    config = IMPLS[impl]
    torch.manual_seed(0)
    model = EPAMNet(num_classes=60, fused=config["fused"]).eval().to(device)
    if config["channels_last"]:
        model = model.to(memory_format=torch.channels_last_3d)
    imgs, heatmaps = _clip(device, config["channels_last"])

    def infer():
        with torch.no_grad():
            return model(imgs, heatmaps)

    infer()
    measure("EPAMNet inference", "1 clip, 60 classes", impl, infer, 0, device, cuda_calls=5)


# Peak resident memory of one forward pass above the resident memory before it. Linux resets the high-water mark
# on writing 5 to /proc/self/clear_refs, so the import's own peak does not hide the forward pass's.
_PEAK_MEMORY_SCRIPT = """
import json, sys, torch
from epamx.models import EPAMNet

def status():
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("VmHWM", "VmRSS"))}

torch.set_num_threads(2)
model = EPAMNet(num_classes=60).eval()
for m in model.modules():
    if hasattr(m, "inplace_shift"):
        m.inplace_shift = sys.argv[1] == "inplace"
batch = int(sys.argv[2])
imgs, heatmaps = torch.randn(batch, 3, 16, 224, 224), torch.rand(batch, 17, 48, 56, 56)
with torch.no_grad():
    model(imgs, heatmaps)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status()["VmRSS"]
    model(imgs, heatmaps)
print(json.dumps({"before": before, "peak": status()["VmHWM"]}))
"""


def test_epamnet_inference_peak_memory(record_metric, device):
    """4 clips: at batch 1 the difference is within the resident-memory noise of malloc's retained heap."""
    if device.type != "cpu":
        pytest.skip("peak resident memory is measured for CPU inference")
    peaks = {}
    for mode in ("inplace", "out_of_place"):
        out = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_SCRIPT, mode, "4"], capture_output=True, text=True,
                             check=True)
        result = json.loads(out.stdout)
        peaks[mode] = (result["peak"] - result["before"]) / 1024
        record_metric("EPAMNet inference peak memory above start (MiB)", f"4 clips, shift {mode}", f"{peaks[mode]:.0f}")
    saved = peaks["out_of_place"] - peaks["inplace"]
    record_metric("EPAMNet inference peak memory saved by the in-place shift", "4 clips",
                  f"{saved:.0f} MiB ({saved / peaks['out_of_place']:.0%})")


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_epamnet_training_step(measure, device, impl):
    """Forward + backward + SGD step: batch 12 with bfloat16 autocast on a GPU (goal: fused >= 1.3x the
    reference); batch 2 in float32 on a CPU, where a step of 12 clips takes tens of seconds."""
    cuda = device.type == "cuda"
    batch = 12 if cuda else 2
    torch.manual_seed(0)
    model = EPAMNet(num_classes=60, fused=impl == "fused").to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=3e-4)
    imgs = torch.randn(batch, 3, 16, 224, 224, device=device)
    heatmaps = torch.rand(batch, 17, 48, 56, 56, device=device)
    labels = torch.randint(0, 60, (batch,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            rgb_logits, pose_logits = model(imgs, heatmaps)
            loss = torch.nn.functional.cross_entropy(rgb_logits, labels) + \
                torch.nn.functional.cross_entropy(pose_logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 40.0)
        optimizer.step()

    step()
    measure("EPAMNet training step", f"batch {batch}{', bf16 autocast' if cuda else ', fp32'}", impl, step, 0, device,
            cuda_calls=2)
