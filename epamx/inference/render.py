"""What EPAM-Net attends to on one clip (``epamx render``): a PNG sheet, and for a video an MP4 to watch."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from epamx.config import Config
from epamx.data import ClipDataset
from epamx.data.sampling import rgb_frame_indices, uniform_sample_frames
from epamx.data.transforms import is_precropped, person_box
from epamx.errors import CheckpointError
from epamx.inference.inputs import build_batch_transform, clip_batch
from epamx.models import EPAMNet
from epamx.models.streams import model_mode
from epamx.ops import COCO17_LIMBS

__all__ = ["render_attention", "render_video"]


def _attention(model: EPAMNet, cfg: Config, dataset: ClipDataset, index: int, device: torch.device):
    """Clip ``index``'s batch, heatmaps, class probabilities (C,), spatial attention S (1, 1, T, 7, 7) and temporal
    attention A (1, 1, T, 1, 1), from the model's own forward_with_attention."""
    if model_mode(model) != "epamnet":
        raise CheckpointError("render needs an EPAM-Net checkpoint (the epamnet stage's): the single-stream models have "
                              "no attention")
    transform = build_batch_transform(cfg, "epamnet", device)
    batch, (imgs, heatmaps, _) = clip_batch(transform, dataset, [index], device)
    rgb_logits, pose_logits, spatial, temporal = model.forward_with_attention(imgs, heatmaps)
    return batch, heatmaps, (rgb_logits + pose_logits).float().softmax(-1)[0], spatial, temporal


@torch.no_grad()
def render_attention(model: EPAMNet, cfg: Config, dataset: ClipDataset, index: int, out_png: os.PathLike,
                     device: torch.device = torch.device("cpu")) -> Path:
    """A PNG of clip ``index`` of ``dataset``: its RGB frames; the pose heatmaps (max over joints) at the same
    frames; the frames with EPAM-Net's pose-driven spatial attention S overlaid; the temporal attention A as a
    bar per frame; and the top-3 prediction. ``model`` must be an EPAM-Net (the streams have no attention)."""
    from epamx.plots import pyplot, save_figure

    batch, heatmaps, probs, spatial, temporal = _attention(model, cfg, dataset, index, device)
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


@torch.no_grad()
def render_video(model: EPAMNet, cfg: Config, dataset: ClipDataset, index: int, out_mp4: os.PathLike,
                 device: torch.device = torch.device("cpu")) -> Path:
    """An MP4 of clip ``index`` of ``dataset`` (a clip of a video file): every frame of its video, at the video's
    size (an odd side less one pixel) and rate, with the persons' skeletons (COCO-17 limbs), EPAM-Net's spatial
    attention S of the nearest sampled RGB frame overlaid on the crop it saw, the temporal attention A as bars along
    the bottom (the nearest sampled frame's highlighted) and the top class with its score. Decoded and written a
    frame at a time."""
    from epamx.data.decoding import decode_video, write_video_stream

    _, _, probs, spatial, temporal = _attention(model, cfg, dataset, index, device)
    ann = dataset.annotations[index]
    top = int(probs.argmax())
    caption = f"{dataset.class_names[top]} {float(probs[top]):.2f}"
    rgb_at = rgb_frame_indices(uniform_sample_frames(ann["total_frames"], dataset.clip_len, test_mode=True),
                               dataset.rgb_every)
    size = dataset.frame_size
    t = len(rgb_at)
    s_up = torch.nn.functional.interpolate(spatial[:1].float(), size=(t, size, size), mode="trilinear",
                                           align_corners=False)[0, 0].cpu().numpy()
    a = temporal[0, 0, :, 0, 0].float().cpu().numpy()
    video = dataset.rgb_source(ann["frame_dir"])

    def frames():
        box = None
        for i, (frame, fps) in enumerate(_decoded_rgb(decode_video(video))):
            if box is None:
                box = _crop_box(dataset, ann, frame.shape[:2])
            j = int(np.abs(rgb_at - i).argmin())
            yield _annotated(frame, ann, i, box, s_up[j], a, j, caption)

    opened = decode_video(video)
    fps = next(opened)[1].average_rate or 30
    opened.close()
    write_video_stream(out_mp4, frames(), fps=float(fps))
    return Path(out_mp4)


def _decoded_rgb(decoded):
    from epamx.data.decoding import frame_rgb

    for frame, stream in decoded:
        yield frame_rgb(frame), stream


def _crop_box(dataset: ClipDataset, ann, shape):
    """The box the clip's RGB frames were cropped to, as ClipDataset crops them."""
    if dataset.rgb_precropped and is_precropped(shape):
        return 0, 0, shape[1], shape[0]
    return person_box(ann["keypoint"], ann["img_shape"], shape)


def _annotated(frame: np.ndarray, ann, i: int, box, attention: np.ndarray, a: np.ndarray, j: int, caption: str
               ) -> np.ndarray:
    """One output frame (the input's size, sides made even): attention over the box, skeletons, bars, caption."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    h, w = frame.shape[:2]
    out = frame[: h - h % 2, : w - w % 2].astype(np.float32)
    x0, y0, x1, y1 = box
    x1, y1 = min(x1, out.shape[1]), min(y1, out.shape[0])
    if x1 > x0 and y1 > y0:
        heat = np.asarray(Image.fromarray(np.clip(attention * 255, 0, 255).astype(np.uint8)).resize(
            (x1 - x0, y1 - y0), Image.BILINEAR), np.float32) / 255
        colour = colormaps["jet"](heat)[..., :3] * 255
        out[y0:y1, x0:x1] = 0.6 * out[y0:y1, x0:x1] + 0.4 * colour
    img = Image.fromarray(out.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    width = max(1, round(min(h, w) / 200))
    if i < ann["keypoint"].shape[1]:
        for kp, score in zip(ann["keypoint"][:, i], ann["keypoint_score"][:, i]):
            for p, q in COCO17_LIMBS:
                if score[p] > 0 and score[q] > 0:
                    draw.line([tuple(kp[p]), tuple(kp[q])], fill=(255, 255, 255), width=width)
    bar_h, n = max(4, h // 8), len(a)
    for k in range(n):
        left, right = k * img.width // n, (k + 1) * img.width // n - 1
        top = img.height - 1 - int(round(float(a[k]) * bar_h))
        draw.rectangle([left, top, right, img.height - 1], fill=(255, 140, 0) if k == j else (120, 120, 120))
    try:
        font = ImageFont.load_default(size=max(10, h // 24))
    except TypeError:  # Pillow < 10.1: one size
        font = ImageFont.load_default()
    draw.text((4, 2), caption, fill=(255, 255, 0), font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    return np.asarray(img)
