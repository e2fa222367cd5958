"""The Dataset, its collate function and the DataLoader set-up.

A clip is a plain dict that workers produce from one annotation: uint8 RGB frames and float keypoints, never
heatmaps or float frames (those are made batched on the training device by :class:`epamx.data.BatchTransform`)::

    {'imgs': uint8 (T, H, W, 3)       # RGB frames: every rgb_every-th sampled frame, frame_size square
     'keypoint': float32 (M, T_p, V, 2), 'keypoint_score': float32 (M, T_p, V)   # image pixels, M = max_persons
     'img_shape': int64 (2,)          # (h, w) the keypoints refer to
     'flip': bool, 'label': int, 'index': int, 'frame_dir': str}

How the authors' pipeline's corner cases are handled:
- fewer frames than clip_len: the sampler loops over the video (uniform_sample_frames);
- no person at all: the clip's keypoints are all absent, its heatmaps are zero (as GeneratePoseTarget draws
  nothing), the RGB frames are used as they are;
- more persons than max_persons: the highest-scoring ones are kept; fewer: padded with absent persons;
- keypoints outside the image: kept; the crop box is clipped to the image (MMCompact's allow_imgpad=False) and
  heatmaps draw only what falls on the grid; NaN coordinates are treated as missing (0), as MMCompact does.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from epamx.data.annotations import check_labels, inferred_class_count, load_annotation_file, read_label_map
from epamx.data.batch_transform import SKELETONS
from epamx.data.config import DataConfig
from epamx.data.decoding import read_frame_folder, read_video
from epamx.data.pipelines import get_pipeline
from epamx.data.sampler import ClipSampler, sample_seed
from epamx.data.sampling import rgb_frame_indices, uniform_sample_frames
from epamx.data.transforms import crop_resize_frames, is_precropped, person_box, posec3d_keypoints, select_persons
from epamx.errors import DataError, DataFileNotFound

__all__ = ["ClipDataset", "SampleError", "build_dataset", "build_loader", "collate_clips"]

log = logging.getLogger("epamx.data")
MODALITIES = ("rgb", "pose")


class SampleError(DataError):
    """A sample could not be read; the message names the sample and the file."""


class ClipDataset(torch.utils.data.Dataset):
    """Clips of an annotation list (see the module docstring for what a clip holds).

    Args:
        annotations: validated annotation dicts (epamx.data.load_annotations).
        class_names: one name per label.
        train: random frame offsets and flips (seeded per clip by the sampler), or the fixed test-mode sampling.
        modalities: ("rgb", "pose") or one of them; a pose-only dataset never opens a video.
        video_root / video_suffix, or frame_root / frame_template: where the RGB frames are.
        rgb_precropped: frames are already cropped to the persons (as the authors' prepared videos); otherwise
            they are cropped to the persons' box over the whole video and resized here. Frames that are not square
            cannot be cropped ones: they are cropped here whatever this says (with a warning), never squashed.
        clip_len, rgb_every, frame_size, max_persons, flip_prob: as in DataConfig.
        skip_bad: return None for an unreadable sample (collate drops it and counts it) instead of raising.
        pipeline: the input pipeline's name (epamx.data.pipelines): "multimodal" (the default), "pose_only" (its
            keypoints come cropped to a ``heatmap_size`` square, randomly when training) or "rgb_only" (its
            ``clip_len // rgb_every`` frames sampled on their own).
        heatmap_size: the heatmaps' side, the pose-only pipeline's keypoint grid.

    ``dataset[index]`` or ``dataset[(index, seed)]`` (what ClipSampler yields) is one clip; a sample that cannot be
    read raises SampleError naming the sample and the file, with the decoder's error as its cause. Settings out of
    range raise ValueError.
    """

    def __init__(self, annotations: List[Dict[str, Any]], class_names: Sequence[str], train: bool,
                 modalities: Sequence[str] = MODALITIES, video_root: str = "", video_suffix: str = ".mp4",
                 frame_root: str = "", frame_template: str = "img_{:05d}.jpg", rgb_precropped: bool = True,
                 clip_len: int = 48, rgb_every: int = 3, frame_size: int = 224, max_persons: int = 2,
                 flip_prob: float = 0.5, skip_bad: bool = False, pipeline: str = "multimodal",
                 heatmap_size: int = 56):
        modalities = tuple(modalities)
        if not modalities or any(m not in MODALITIES for m in modalities):
            raise ValueError(f"ClipDataset: modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        self.pipeline = get_pipeline(pipeline)
        problem = self.pipeline.check_streams(modalities)
        if problem:
            raise ValueError(f"ClipDataset: {problem}")
        if "rgb" in modalities and not (video_root or frame_root):
            raise ValueError("ClipDataset: the RGB stream needs video_root (videos) or frame_root (JPEG folders)")
        for name, value in (("clip_len", clip_len), ("rgb_every", rgb_every), ("frame_size", frame_size),
                            ("max_persons", max_persons), ("heatmap_size", heatmap_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ClipDataset: {name} must be an int >= 1, got {value!r}")
        if clip_len % rgb_every:
            raise ValueError(f"ClipDataset: clip_len ({clip_len}) must be a multiple of rgb_every ({rgb_every}) so "
                             f"the pose frames are a multiple of the RGB frames")
        self.annotations = annotations
        self.class_names = list(class_names)
        self.train = train
        self.modalities = modalities
        self.video_root, self.video_suffix = video_root, video_suffix
        self.frame_root, self.frame_template = frame_root, frame_template
        self.rgb_precropped = rgb_precropped
        self.clip_len, self.rgb_every, self.frame_size = clip_len, rgb_every, frame_size
        self.heatmap_size = heatmap_size
        self.max_persons = max_persons
        self.flip_prob = flip_prob
        self.skip_bad = skip_bad
        self._warned_raw = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.annotations)

    def rgb_source(self, frame_dir: str) -> str:
        if self.video_root:
            return os.path.join(self.video_root, frame_dir + self.video_suffix)
        return os.path.join(self.frame_root, frame_dir)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Optional[Dict[str, Any]]:
        index, seed = key if isinstance(key, tuple) else (int(key), sample_seed(0, 0, int(key)))
        ann = self.annotations[index]
        try:
            return self._load(index, ann, np.random.RandomState(seed))
        except (OSError, RuntimeError, ValueError) as e:
            message = f"sample {index} ({ann['frame_dir']!r}): {e}"
            if self.skip_bad:
                log.warning("skipped %s", message)
                return None
            raise SampleError(message) from e

    def _load(self, index: int, ann: Dict[str, Any], rng: np.random.RandomState) -> Dict[str, Any]:
        if self.pipeline.rgb_sampling == "direct":  # the RGB frames sampled on their own (and the keypoints with them)
            inds = uniform_sample_frames(ann["total_frames"], self.clip_len // self.rgb_every,
                                         test_mode=not self.train, rng=rng)
            rgb_inds = inds
        else:
            inds = uniform_sample_frames(ann["total_frames"], self.clip_len, test_mode=not self.train, rng=rng)
            rgb_inds = rgb_frame_indices(inds, self.rgb_every)
        flip = bool(self.train and rng.rand() < self.flip_prob)
        kp_all, score_all = ann["keypoint"], ann["keypoint_score"]
        m, _, v, _ = kp_all.shape
        if m:
            kp, score = kp_all[:, inds], score_all[:, inds]
        else:
            kp = np.zeros((0, len(inds), v, 2), np.float32)
            score = np.zeros((0, len(inds), v), np.float32)
        kp, score = select_persons(np.nan_to_num(kp, nan=0.0), score, self.max_persons)
        img_shape = tuple(ann["img_shape"])
        if self.pipeline.pose_crop == "posec3d":  # cropped here, randomly when training; the device only rescales
            kp = posec3d_keypoints(kp, img_shape, self.heatmap_size, rng if self.train else None)
            img_shape = (self.heatmap_size, self.heatmap_size)
        sample = {"keypoint": torch.from_numpy(np.ascontiguousarray(kp, dtype=np.float32)),
                  "keypoint_score": torch.from_numpy(np.ascontiguousarray(score, dtype=np.float32)),
                  "img_shape": torch.tensor(img_shape, dtype=torch.int64),
                  "flip": flip, "label": ann["label"], "index": index, "frame_dir": ann["frame_dir"]}
        if "rgb" in self.modalities:
            sample["imgs"] = torch.from_numpy(self._frames(ann, rgb_inds))
        return sample

    def _read_frames(self, ann: Dict[str, Any], inds: np.ndarray) -> np.ndarray:
        """uint8 (len(inds), H, W, 3) RGB frames ``inds`` of the clip's video or frame folder, as stored."""
        source = self.rgb_source(ann["frame_dir"])
        if self.video_root:
            return read_video(source, inds)
        return read_frame_folder(source, inds, self.frame_template)

    def _frames(self, ann: Dict[str, Any], inds: np.ndarray) -> np.ndarray:
        source = self.rgb_source(ann["frame_dir"])
        frames = self._read_frames(ann, inds)
        shape = frames.shape[1:3]
        if self.rgb_precropped and is_precropped(shape):
            return crop_resize_frames(frames, (0, 0, shape[1], shape[0]), self.frame_size)
        if self.rgb_precropped and not self._warned_raw:
            self._warned_raw = True
            log.warning("%s: frames of %dx%d are not square, so not cropped to the persons as data.rgb_precropped "
                        "= true says: cropped to them here, as `epamx prepare` would (set data.rgb_precropped = "
                        "false for raw videos)", source, *shape)
        # the authors' offline crop: one box around every person over the whole video
        return crop_resize_frames(frames, person_box(ann["keypoint"], ann["img_shape"], shape), self.frame_size)


def collate_clips(samples: List[Optional[Dict[str, Any]]]) -> Optional[Dict[str, Any]]:
    """Stack clips into a batch (the keys of a clip, each stacked along a new first dimension N; 'frame_dir' a
    list); samples that could not be read (None, with skip_bad) are dropped and counted in 'skipped'. Returns None
    if the whole batch was unreadable; raises SampleError for clips that cannot share a batch."""
    kept = [s for s in samples if s is not None]
    if not kept:
        return None
    persons = max(s["keypoint"].shape[0] for s in kept)
    shapes = {tuple(s["keypoint"].shape[1:]) for s in kept}
    if len(shapes) != 1:
        raise SampleError(f"clips of one batch have different (frames, joints, 2): {sorted(shapes)} (frame_dirs "
                          f"{[s['frame_dir'] for s in kept]}); every annotation must use the same skeleton")
    if any(s["keypoint"].shape[0] != persons for s in kept):
        raise SampleError("clips of one batch have different person counts; build them with the same max_persons")
    batch = {
        "keypoint": torch.stack([s["keypoint"] for s in kept]),
        "keypoint_score": torch.stack([s["keypoint_score"] for s in kept]),
        "img_shape": torch.stack([s["img_shape"] for s in kept]),
        "flip": torch.tensor([s["flip"] for s in kept], dtype=torch.bool),
        "label": torch.tensor([s["label"] for s in kept], dtype=torch.int64),
        "index": torch.tensor([s["index"] for s in kept], dtype=torch.int64),
        "frame_dir": [s["frame_dir"] for s in kept],
        "skipped": len(samples) - len(kept),
    }
    if "imgs" in kept[0]:
        frame_shapes = {tuple(s["imgs"].shape) for s in kept}
        if len(frame_shapes) != 1:
            raise SampleError(f"clips of one batch have different frame shapes {sorted(frame_shapes)}")
        batch["imgs"] = torch.stack([s["imgs"] for s in kept])
    return batch


def _class_names(cfg: DataConfig, ann_file: str, file_classes: Optional[List[str]],
                 annotations: List[Dict[str, Any]], num_classes: Optional[int]) -> List[str]:
    """data.label_map's names, else the pickle's 'classes', else class_<i> (as many as ``num_classes`` or the labels
    imply); every label must have a name. Padded with class_<i> up to ``num_classes``."""
    if getattr(cfg, "label_map", ""):
        names = read_label_map(cfg.label_map)
        check_labels(annotations, len(names), ann_file, f"data.label_map {cfg.label_map} names")
    elif file_classes is not None:
        names = file_classes
        check_labels(annotations, len(names), ann_file, "the file's 'classes' list names")
    else:
        names = []
    if num_classes is None and not names:
        num_classes = inferred_class_count(annotations, ann_file)
    if num_classes is not None and len(names) < num_classes:
        names += [f"class_{i}" for i in range(len(names), num_classes)]
    return names


def build_dataset(cfg: DataConfig, split: str, train: bool, modalities: Sequence[str] = MODALITIES,
                  num_classes: Optional[int] = None, progress: bool = True,
                  pipeline: str = "multimodal") -> ClipDataset:
    """The dataset ``cfg`` describes, for ``split`` ("train"/"val" or the pickle's own names; the config's
    train_split / val_split are what the training command passes). The embedded dataset is generated (and cached)
    on first use. ``pipeline`` names the input pipeline (epamx.data.pipelines; a training stage's own).

    Class names: data.label_map's, else the pickle's 'classes', else class_<i> for ``num_classes`` or, when that is
    None, for the count the labels imply (epamx.data.annotations.inferred_class_count, which refuses a label far
    beyond the others); padded with class_<i> up to ``num_classes``. Every label must be below the class count.
    Raises DataError (AnnotationError for the file's content) or DataFileNotFound, naming the key or the file and
    the sample."""
    video_root, frame_root, ann_file = cfg.video_root, cfg.frame_root, cfg.ann_file
    if cfg.dataset == "embedded":
        from epamx.data.embedded import build_embedded

        paths = build_embedded(cfg, progress=progress)
        ann_file = paths["ann_file"]
        video_root, frame_root = paths.get("video_root", ""), paths.get("frame_root", "")
    elif cfg.dataset != "posec3d":
        raise DataError(f"data.dataset must be 'embedded' or 'posec3d', got {cfg.dataset!r}")
    if cfg.skeleton not in SKELETONS:
        raise DataError(f"data.skeleton must be one of {sorted(SKELETONS)}, got {cfg.skeleton!r}")
    if not ann_file:
        raise DataError("data.ann_file is empty: give the PoseC3D annotation pickle (e.g. data.ann_file=ntu60_2d.pkl)")
    if not os.path.exists(ann_file):
        raise DataFileNotFound(f"data.ann_file {ann_file} does not exist")
    if "rgb" in modalities:
        root = video_root or frame_root
        if not root:
            raise DataError("the RGB stream needs data.video_root (videos) or data.frame_root (JPEG frame folders)")
        if not os.path.isdir(root):
            raise DataFileNotFound(f"data.{'video_root' if video_root else 'frame_root'} {root} is not a folder")
    annotations, file_classes = load_annotation_file(ann_file, split, num_classes=num_classes,
                                                     num_joints=SKELETONS[cfg.skeleton][0])
    if not annotations:
        raise DataError(f"{ann_file}: split {split!r} is empty")
    names = _class_names(cfg, ann_file, file_classes, annotations, num_classes)
    return ClipDataset(annotations, names, train, modalities, video_root, cfg.video_suffix, frame_root,
                       cfg.frame_template, cfg.rgb_precropped, cfg.clip_len, cfg.rgb_every, cfg.frame_size,
                       cfg.max_persons, cfg.flip_prob, cfg.skip_bad, pipeline, cfg.heatmap_size)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode; the main process's threads run the model


def build_loader(dataset: ClipDataset, batch_size: int, train: bool, seed: int = 0, workers: int = 0,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` for process ``rank`` of ``world_size``. Its sampler is a
    :class:`ClipSampler`: call ``loader.sampler.set_epoch(epoch, skip)`` before each epoch. Training drops the
    last incomplete batch; evaluation keeps every clip."""
    if batch_size < 1:
        raise ValueError(f"build_loader: batch_size must be >= 1, got {batch_size}")
    sampler = ClipSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world_size)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_clips,
        pin_memory=pin_memory, drop_last=train and len(sampler) >= batch_size, persistent_workers=workers > 0,
        worker_init_fn=_worker_init if workers > 0 else None, prefetch_factor=4 if workers > 0 else None)
