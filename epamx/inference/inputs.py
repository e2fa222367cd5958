"""The model's inputs for chosen clips: entries of an annotation pickle with their videos or frame folders, or one
video plus a keypoints file, read through the training pipeline in test mode (epamx.data), and the device-side
transform that turns a batch of them into (imgs, heatmaps, labels).

A keypoints file is a .npz or .pkl holding 'keypoint' (M, T, V, 2) in the video's pixels for each of its frames,
optionally 'keypoint_score' (M, T, V), 'img_shape' (h, w) and the annotated 'label'. Without one, a pose estimator
(epamx.pose; MediaPipe Pose by default) finds the keypoints in the video.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import epamx.data as data
from epamx.config import Config
from epamx.data import BatchTransform, ClipDataset, collate_clips, load_annotations
from epamx.data.annotations import AnnotationError, safe_load_pickle, validate_annotation
from epamx.data.decoding import SHORT_VIDEO_TOLERANCE, DecodeError, decode_video
from epamx.errors import ConfigError, DataError, DataFileNotFound
from epamx.models.streams import modalities
from epamx.pose.estimator import EstimatorFactory, load_estimator

__all__ = ["build_batch_transform", "clip_batch", "clip_from_video", "clips", "clips_from_annotations"]


def build_batch_transform(cfg: Config, mode: str, device: torch.device) -> BatchTransform:
    """The device-side transform for a model of ``mode``, on ``device``, for clips read through that stage's
    pipeline (``cfg.stage(mode).pipeline``); the config's heatmap channels must be the skeleton's joints."""
    transform = data.BatchTransform(cfg.data, modalities(mode), cfg.stage(mode).pipeline)
    joints = transform.num_joints
    if "pose" in transform.modalities and joints is not None and joints != cfg.model.pose_channels:
        raise ConfigError(f"model.pose_channels = {cfg.model.pose_channels}, but data.skeleton "
                          f"{cfg.data.skeleton!r} renders {joints} heatmap channels")
    return transform.to(device)


def clip_batch(transform: BatchTransform, dataset: ClipDataset, indices: Sequence[int], device: torch.device,
               channels_last: bool = False) -> Tuple[Dict[str, Any], Tuple]:
    """The collated batch of ``dataset[indices]`` and the model's inputs made from it."""
    batch = collate_clips([dataset[i] for i in indices])
    return batch, transform(batch, device, channels_last)


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
                       max_persons=d.max_persons, pipeline=cfg.stage(mode).pipeline, heatmap_size=d.heatmap_size)


def clips_from_annotations(cfg: Config, class_names: Sequence[str], mode: str, ann_file: str,
                           samples: Sequence[str] = (), split: Optional[str] = None, video_root: str = "",
                           frame_root: str = "") -> ClipDataset:
    """Entries ``samples`` (frame_dirs) or ``split`` of an annotation pickle, read as for evaluation."""
    annotations = load_annotations(ann_file, list(samples) if samples else split)
    return _dataset(cfg, annotations, class_names, mode, video_root, frame_root=frame_root)


def _read_keypoints(keypoints: str) -> Dict[str, Any]:
    if not os.path.isfile(keypoints):
        raise DataFileNotFound(f"keypoints file {keypoints} does not exist")
    if keypoints.endswith(".npz"):
        try:
            with np.load(keypoints, allow_pickle=False) as f:
                entry = {k: f[k] for k in f.files}
        except (OSError, ValueError) as exc:
            raise DataError(f"{keypoints}: not a readable .npz file ({exc})") from exc
    else:
        entry = safe_load_pickle(keypoints)
    if not isinstance(entry, dict) or "keypoint" not in entry:
        raise AnnotationError(f"{keypoints}: expected a dict (or .npz) with 'keypoint' (M, T, V, 2)")
    return dict(entry)


def _video_facts(video: Path) -> Tuple[int, Tuple[int, int]]:
    """A video's frame count and (h, w), by decoding it (no pixel conversion)."""
    count, shape = 0, None
    for frame, _ in decode_video(video):
        shape = shape or (frame.height, frame.width)
        count += 1
    if shape is None:
        raise DecodeError(f"{video}: the video has no frames")
    return count, shape


def _check_frame_count(keypoints: str, video: Path, keypoint_frames: int, video_frames: int) -> None:
    # A video may end a little before its keypoints (as the data pipeline tolerates); any other difference means
    # the keypoints are another video's, or were sampled.
    if not keypoint_frames * (1 - SHORT_VIDEO_TOLERANCE) <= video_frames <= keypoint_frames:
        raise DataError(f"{keypoints}: the keypoints have {keypoint_frames} frames, but the video {video} has "
                        f"{video_frames}: are they this video's?")


def clip_from_video(cfg: Config, class_names: Sequence[str], mode: str, video: str, keypoints: Optional[str] = None,
                    precropped: bool = False, estimator: Optional[EstimatorFactory] = None) -> ClipDataset:
    """One clip from a video file and its keypoints file (see the module docstring), or, without one, the keypoints
    a PoseEstimator finds in the video: ``estimator`` makes it (a class or function; default MediaPipePose,
    epamx.pose). Raises DataFileNotFound, DecodeError
    (not a video, no frames), or DataError for a keypoints file whose frame count is not the video's, each naming
    the file."""
    video_path = Path(video)
    if not video_path.is_file():
        raise DataFileNotFound(f"video {video} does not exist")
    name = video_path.name
    stem = name.split(".")[0]
    count = None
    if keypoints is None:
        entry, source = _estimate(video_path, estimator), str(video_path)
        del entry["label"]  # a video alone has no annotated class
    else:
        entry, source = _read_keypoints(keypoints), keypoints
        count, shape = _video_facts(video_path)
        entry.setdefault("img_shape", shape)
        if isinstance(entry["img_shape"], np.ndarray):
            entry["img_shape"] = tuple(int(v) for v in entry["img_shape"])
        entry.setdefault("total_frames", int(np.asarray(entry["keypoint"]).shape[1]))
    # a label past the class names is none: render then claims no annotated class for the clip
    entry["label"] = entry.get("label", len(class_names))
    entry["frame_dir"] = stem
    ann = validate_annotation(entry, source, 0)
    if count is not None:
        _check_frame_count(source, video_path, ann["total_frames"], count)
    return _dataset(cfg, [ann], class_names, mode, str(video_path.parent), name[len(stem):], precropped=precropped)


def _estimate(video: Path, estimator: Optional[EstimatorFactory]) -> Dict[str, Any]:
    from epamx.pose import video_annotation

    made = (estimator or load_estimator("mediapipe"))()
    try:
        return video_annotation(video, made)
    finally:
        made.close()


def clips(cfg: Config, class_names: Sequence[str], mode: str, *, video: Optional[str] = None,
          keypoints: Optional[str] = None, precropped: bool = False, ann_file: Optional[str] = None,
          samples: Sequence[str] = (), split: Optional[str] = None, video_root: str = "",
          frame_root: str = "", estimator: Optional[EstimatorFactory] = None) -> ClipDataset:
    """The clips a user asked for: a video with its keypoints file, or without one its keypoints estimated by
    a PoseEstimator made by ``estimator`` (default MediaPipePose); or entries (``samples``, else ``split``, else the
    config's held-out split) of ``ann_file`` (default: the config's dataset)."""
    if keypoints and not video:
        raise DataError("a keypoints file goes with its video (--keypoints with --video)")
    if video:
        return clip_from_video(cfg, class_names, mode, video, keypoints, precropped=precropped, estimator=estimator)
    if ann_file is None:
        if cfg.data.dataset == "embedded":
            from epamx.data.embedded import build_embedded

            ann_file = build_embedded(cfg.data, progress=False)["ann_file"]
        else:
            ann_file = cfg.data.ann_file
    if not split and not samples:
        split = cfg.data.val_split
    return clips_from_annotations(cfg, class_names, mode, ann_file, samples, split, video_root=video_root,
                                  frame_root=frame_root)
