"""A picture of what EPAM-Net attends to on one clip (``epamx render``)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from epamx.config import Config
from epamx.data import ClipDataset
from epamx.errors import CheckpointError
from epamx.inference.inputs import build_batch_transform, clip_batch
from epamx.models import EPAMNet
from epamx.models.streams import model_mode

__all__ = ["render_attention"]


@torch.no_grad()
def render_attention(model: EPAMNet, cfg: Config, dataset: ClipDataset, index: int, out_png: os.PathLike,
                     device: torch.device = torch.device("cpu")) -> Path:
    """A PNG of clip ``index`` of ``dataset``: its RGB frames; the pose heatmaps (max over joints) at the same
    frames; the frames with EPAM-Net's pose-driven spatial attention S overlaid; the temporal attention A as a
    bar per frame; and the top-3 prediction. ``model`` must be an EPAM-Net (the streams have no attention)."""
    from epamx.plots import pyplot, save_figure

    if model_mode(model) != "epamnet":
        raise CheckpointError("render needs an EPAM-Net checkpoint (the epamnet stage's): the single-stream models have "
                         "no attention")
    transform = build_batch_transform(cfg, "epamnet", device)
    batch, (imgs, heatmaps, _) = clip_batch(transform, dataset, [index], device)
    rgb_logits, pose_logits, spatial, temporal = model.forward_with_attention(imgs, heatmaps)
    probs = (rgb_logits + pose_logits).float().softmax(-1)[0]
    top = probs.topk(min(3, probs.numel()))
    names = dataset.class_names
    frames = batch["imgs"][0]
    if bool(batch["flip"][0]):
        frames = frames.flip(2)
    frames = frames.numpy()                                                         # (T, H, W, 3)
    t, h, w = frames.shape[:3]
    stride = heatmaps.shape[2] // t
    hm = heatmaps[0].amax(0)[::stride].float().cpu().numpy()                        # (T, h, w)
    s_up = torch.nn.functional.interpolate(spatial[:1].float(), size=(t, h, w), mode="trilinear",
                                           align_corners=False)[0, 0].cpu().numpy()
    a = temporal[0, 0, :, 0, 0].float().cpu().numpy()

    plt = pyplot()
    fig, axes = plt.subplots(4, t, figsize=(max(7.0, 1.2 * t), 5.6), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 1, 1, 0.8]})
    for i in range(t):
        axes[0, i].imshow(frames[i])
        axes[1, i].imshow(hm[i], cmap="magma", vmin=0, vmax=max(1e-6, float(hm.max())))
        axes[2, i].imshow(frames[i])
        axes[2, i].imshow(s_up[i], cmap="jet", alpha=0.45, vmin=0, vmax=1, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        for r in range(3):
            axes[r, i].set_xticks([])
            axes[r, i].set_yticks([])
        axes[0, i].set_title(f"t={i}", fontsize=7)
        axes[3, i].remove()
    axes[0, 0].set_ylabel("RGB", fontsize=8)
    axes[1, 0].set_ylabel("heatmaps", fontsize=8)
    axes[2, 0].set_ylabel("spatial S", fontsize=8)
    bar = fig.add_subplot(4, 1, 4)
    bar.bar(np.arange(t), a, color="tab:orange")
    bar.set_xlim(-0.5, t - 0.5)
    bar.set_ylim(0, 1)
    bar.set_ylabel("temporal A", fontsize=8)
    bar.set_xlabel("RGB frame", fontsize=8)
    label = int(batch["label"][0])
    truth = f"  (annotated: {names[label]})" if label < len(names) else ""
    guesses = ", ".join(f"{names[c]} {p:.2f}" for p, c in zip(top.values.tolist(), top.indices.tolist()))
    fig.suptitle(f"{batch['frame_dir'][0]}: {guesses}{truth}", fontsize=9)
    return save_figure(fig, out_png, dpi=110)
