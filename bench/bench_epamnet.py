"""EPAM-Net inference on one clip (batch 1: 16 RGB frames at 224x224, 48 heatmap frames of 17 joints at 56x56),
fused ops against the plain-PyTorch reference path in the same run, and the peak memory of inference with the
in-place shift against the out-of-place one.

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
    measure("EPAMNet inference", "1 clip, 60 classes", impl, infer, imgs.numel() * 4 + heatmaps.numel() * 4, device,
            cuda_calls=5)


_PEAK_MEMORY_SCRIPT = """
import json, resource, sys, torch
from epamx.models import EPAMNet
torch.set_num_threads(2)
model = EPAMNet(num_classes=60).eval()
for m in model.modules():
    if hasattr(m, "inplace_shift"):
        m.inplace_shift = sys.argv[1] == "inplace"
imgs, heatmaps = torch.randn(1, 3, 16, 224, 224), torch.rand(1, 17, 48, 56, 56)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    model(imgs, heatmaps)
print(json.dumps({"before": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_epamnet_inference_peak_memory(record_metric, device):
    if device.type != "cpu":
        pytest.skip("peak resident memory is measured for CPU inference")
    peaks = {}
    for mode in ("inplace", "out_of_place"):
        out = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_SCRIPT, mode], capture_output=True, text=True,
                             check=True)
        result = json.loads(out.stdout)
        peaks[mode] = (result["peak"] - result["before"]) / 1024
        record_metric("EPAMNet inference peak memory above start (MiB)", f"1 clip, shift {mode}", f"{peaks[mode]:.0f}")
    record_metric("EPAMNet inference peak memory saved by the in-place shift (MiB)", "1 clip",
                  f"{peaks['out_of_place'] - peaks['inplace']:.0f}")
