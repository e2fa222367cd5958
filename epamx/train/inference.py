"""Using a trained model on chosen clips: top-k predictions (``python -m epamx predict``) and pictures of what the
model attends to (``python -m epamx render``).

Clips are read through the same pipeline as training (epamx.data, test-mode sampling): either entries of an
annotation pickle with their videos or frame folders, or one video plus a keypoints file (.npz or .pkl holding
'keypoint' (M, T, V, 2) in the video's pixels, optionally 'keypoint_score' (M, T, V), 'img_shape' (h, w) and
the annotated 'label').
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from epamx.data import BatchTransform, ClipDataset, collate_clips, load_annotations, read_video
from epamx.data.annotations import AnnotationError, safe_load_pickle, validate_annotation
from epamx.models.streams import modalities, model_mode, stream_logits
from epamx.train.config import Config

__all__ = ["clips_from_annotations", "clip_from_video", "predict", "render_attention", "find_run_file"]


def find_run_file(checkpoint: os.PathLike, name: str = "config.toml") -> Optional[Path]:
    """``name`` in the checkpoint's folder or the folders above it (a stage folder, then its run folder)."""
    folder = Path(checkpoint).resolve().parent
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / name).is_file():
            return candidate / name
    return None


def resolve_checkpoint(path: os.PathLike) -> Path:
    """A checkpoint file, or a run/stage folder: its final.pt (a run folder: the fused stage's, else the last
    stage's that has one)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    for candidate in (path / "final.pt", path / "fused" / "final.pt", path / "rgb" / "final.pt",
                      path / "pose" / "final.pt"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path} holds no final.pt (nor fused/, rgb/ or pose/final.pt): pass a checkpoint file")


def _dataset(cfg: Config, annotations: List[Dict[str, Any]], class_names: Sequence[str], mode: str,
             video_root: str = "", video_suffix: Optional[str] = None, frame_root: str = "",
             precropped: Optional[bool] = None) -> ClipDataset:
    d = cfg.data
    if not (video_root or frame_root) and d.dataset == "embedded":
        from epamx.data.embedded import build_embedded

        paths = build_embedded(d, progress=False)
        video_root, frame_root = paths.get("video_root", ""), paths.get("frame_root", "")
    return ClipDataset(annotations, class_names, train=False, modalities=modalities(mode),
                       video_root=video_root or ("" if frame_root else d.video_root),
                       video_suffix=d.video_suffix if video_suffix is None else video_suffix,
                       frame_root=frame_root or d.frame_root, frame_template=d.frame_template,
                       rgb_precropped=d.rgb_precropped if precropped is None else precropped,
                       clip_len=d.clip_len, rgb_every=d.rgb_every, frame_size=d.frame_size,
                       max_persons=d.max_persons)


def clips_from_annotations(cfg: Config, class_names: Sequence[str], mode: str, ann_file: str,
                           samples: Sequence[str] = (), split: Optional[str] = None, video_root: str = "",
                           frame_root: str = "") -> ClipDataset:
    """Entries ``samples`` (frame_dirs) or ``split`` of an annotation pickle, read as for evaluation."""
    if samples:
        annotations = load_annotations(ann_file, list(samples))
    else:
        annotations = load_annotations(ann_file, split)
    return _dataset(cfg, annotations, class_names, mode, video_root, frame_root=frame_root)


def clip_from_video(cfg: Config, class_names: Sequence[str], mode: str, video: str, keypoints: str,
                    precropped: bool = False) -> ClipDataset:
    """One clip from a video file and a keypoints file (see the module docstring)."""
    video_path = Path(video)
    if not video_path.is_file():
        raise FileNotFoundError(f"video {video} does not exist")
    if not os.path.isfile(keypoints):
        raise FileNotFoundError(f"keypoints file {keypoints} does not exist")
    if keypoints.endswith(".npz"):
        with np.load(keypoints, allow_pickle=False) as f:
            entry = {k: f[k] for k in f.files}
    else:
        entry = safe_load_pickle(keypoints)
    if not isinstance(entry, dict) or "keypoint" not in entry:
        raise AnnotationError(f"{keypoints}: expected a dict (or .npz) with 'keypoint' (M, T, V, 2)")
    entry = dict(entry)
    if "img_shape" not in entry:
        h, w = read_video(video_path, [0]).shape[1:3]
        entry["img_shape"] = (h, w)
    elif isinstance(entry["img_shape"], np.ndarray):
        entry["img_shape"] = tuple(int(v) for v in entry["img_shape"])
    entry.setdefault("total_frames", int(np.asarray(entry["keypoint"]).shape[1]))
    name = video_path.name
    stem = name.split(".")[0]
    # a label past the class names is none: render_attention then claims no annotated class for the clip
    entry.setdefault("label", len(class_names))
    entry["frame_dir"] = stem
    ann = validate_annotation(entry, keypoints, 0)
    return _dataset(cfg, [ann], class_names, mode, str(video_path.parent), name[len(stem):], precropped=precropped)


def _inputs(transform: BatchTransform, dataset: ClipDataset, indices: Sequence[int], device: torch.device):
    batch = collate_clips([dataset[i] for i in indices])
    return batch, transform(batch, device, False)


@torch.no_grad()
def predict(model: torch.nn.Module, cfg: Config, dataset: ClipDataset, top_k: int = 5, batch_size: int = 8,
            device: torch.device = torch.device("cpu")) -> List[Dict[str, Any]]:
    """Top-k classes of every clip of ``dataset``: [{'frame_dir', 'top': [(class, score), ...], 'streams':
    {stream: top class}}], scores the softmax of the fused logits (rgb + pose) or of the single stream's."""
    transform = BatchTransform(cfg.data, modalities(model_mode(model))).to(device)
    names = dataset.class_names
    results = []
    for start in range(0, len(dataset), batch_size):
        indices = list(range(start, min(start + batch_size, len(dataset))))
        batch, (imgs, heatmaps, _) = _inputs(transform, dataset, indices, device)
        logits = stream_logits(model, imgs, heatmaps)
        total = sum(logits.values())
        probs = total.float().softmax(-1)
        k = min(top_k, probs.shape[1])
        scores, classes = probs.topk(k, dim=1)
        for i, frame_dir in enumerate(batch["frame_dir"]):
            results.append({
                "frame_dir": frame_dir,
                "top": [(names[c], round(float(s), 4)) for c, s in zip(classes[i].tolist(), scores[i].tolist())],
                "streams": {s: names[int(v[i].argmax())] for s, v in logits.items()},
            })
    return results


@torch.no_grad()
def render_attention(model: torch.nn.Module, cfg: Config, dataset: ClipDataset, index: int, out_png: os.PathLike,
                     device: torch.device = torch.device("cpu")) -> Path:
    """A PNG of one clip: its RGB frames; the pose heatmaps (max over joints) at the same frames; the frames with
    EPAM-Net's pose-driven spatial attention S overlaid; the temporal attention A as a bar per frame; and the
    top-3 prediction. Needs a fused (EPAM-Net) checkpoint."""
    from epamx.plots import pyplot, save_figure

    if model_mode(model) != "fused":
        raise ValueError("render needs an EPAM-Net (fused) checkpoint: the single-stream models have no attention")
    transform = BatchTransform(cfg.data, modalities("fused")).to(device)
    batch, (imgs, heatmaps, _) = _inputs(transform, dataset, [index], device)
    rgb_feats = model.rgb_backbone(imgs)
    pose_feats = model.pose_backbone(heatmaps)
    stride = heatmaps.shape[2] // imgs.shape[2]
    spatial, temporal = model.attention_module.maps(pose_feats, stride)          # (1,1,T,h,w), (1,1,T,1,1)
    logits = model.rgb_cls_head(model.attention_module(rgb_feats, pose_feats, stride)) + model.pose_cls_head(
        pose_feats)
    probs = logits.softmax(-1)[0]
    top = probs.topk(min(3, probs.numel()))
    names = dataset.class_names
    frames = batch["imgs"][0]
    if bool(batch["flip"][0]):
        frames = frames.flip(2)
    frames = frames.numpy()                                                         # (T, H, W, 3)
    t, h, w = frames.shape[:3]
    hm = heatmaps[0].amax(0)[::stride].cpu().numpy()                                # (T, h, w)
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


def config_for_checkpoint(checkpoint: os.PathLike, config: Optional[str], overrides: Sequence[str]) -> Config:
    """The config a checkpoint was trained with (its run's config.toml), or ``config``, plus ``overrides``."""
    from epamx.train.config import load_config

    if config is None:
        found = find_run_file(checkpoint)
        config = str(found) if found is not None else "embedded"
    return load_config(config, overrides)
