"""Pose heatmaps for EPAM-Net's pose stream (2 persons, 48 frames, COCO-17, 56x56): the fused op against the
NumPy renderer PoseC3D's data loaders run per clip (render_heatmaps_reference: GeneratePoseTarget's loop over
frames, persons and channels, one clip at a time; for a batch, one clip after another), joints only (the paper's
default) and joints + 17 limbs; and a zero-fill of a same-size buffer that already exists as the write-bandwidth
yardstick. bytes = the output's bytes.

Goals: CPU >= 50x the NumPy renderer per clip; CUDA >= 70% of the device's write bandwidth."""
import pytest
import torch

from epamx.ops import COCO17_LIMBS, render_heatmaps, render_heatmaps_reference

# A standing COCO-17 person, (x, y) as fractions of its own box.
_PERSON = torch.tensor([
    [0.50, 0.08], [0.55, 0.05], [0.45, 0.05], [0.60, 0.07], [0.40, 0.07], [0.68, 0.22], [0.32, 0.22],
    [0.75, 0.38], [0.25, 0.38], [0.78, 0.52], [0.22, 0.52], [0.62, 0.55], [0.38, 0.55], [0.64, 0.75],
    [0.36, 0.75], [0.65, 0.95], [0.35, 0.95]])


def poses(clips, persons=2, frames=48, size=56, seed=0):
    """Two people side by side, filling a 56x56 crop the way PoseCompact's padded box does, jittered per frame."""
    g = torch.Generator().manual_seed(seed)
    width = size / 1.25 / persons
    kp = (_PERSON * torch.tensor([width, size / 1.25])).expand(clips, persons, frames, 17, 2).clone()
    kp[..., 0] += (torch.arange(persons) * width + size * 0.1).view(1, persons, 1, 1)
    kp[..., 1] += size * 0.1
    kp += torch.randn(kp.shape, generator=g) * 1.5
    scores = torch.rand(clips, persons, frames, 17, generator=g) * 0.5 + 0.5
    return kp, scores


CASES = {"clip": 1, "batch": 32}


@pytest.mark.parametrize("limbs", [None, COCO17_LIMBS], ids=["joints", "joints+limbs"])
@pytest.mark.parametrize("case", list(CASES))
def test_render_heatmaps(compare, device, case, limbs):
    kp, scores = poses(CASES[case])
    kp, scores = kp.to(device), scores.to(device)
    channels = 17 + (len(limbs) if limbs else 0)
    shape = (kp.shape[0], channels, 48, 56, 56)
    buffer = torch.empty(shape, device=device)
    impls = {"reference": lambda: render_heatmaps_reference(kp, scores, 56, 0.6, limbs),
             "fused": lambda: render_heatmaps(kp, scores, 56, 0.6, limbs),
             "fill": buffer.zero_}
    label = f"{case} {tuple(shape)} {'joints+limbs' if limbs else 'joints'}"
    compare("render_heatmaps", label, impls, device=device, bytes_moved=torch.Size(shape).numel() * 4,
            yardstick="fill")
