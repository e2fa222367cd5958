"""Offline RGB preparation, as the authors prepared their videos (their data_preparation/crop_RGBFrames_PKU.py):
for each annotation, one square box around all persons' keypoints over the whole video (compact_box, the MMCompact
rule), every frame cropped to it and resized to ``size`` x ``size``, written as an H.264 video
``<out_dir>/<frame_dir><out_suffix>`` (``_rgb.mp4``, NTU's naming). A dataset read from these sets
``rgb_precropped`` (the default).

Clips run in parallel worker processes. Each output is written to a temporary name and renamed when complete, so an
output that exists is whole: a run that was killed resumes where it stopped, skipping what exists (a killed writer
may leave a hidden ``.<name>.tmp<pid>.mp4`` behind, which later runs ignore).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from epamx.data.annotations import load_annotations
from epamx.data.dataset import SampleError
from epamx.data.decoding import DecodeError, decode_video, frame_rgb, read_frame_folder, write_video
from epamx.data.transforms import crop_resize_frames, person_box
from epamx.errors import DataError, DataFileNotFound

__all__ = ["prepare_videos"]

log = logging.getLogger("epamx.data")
PathLike = Union[str, os.PathLike]
_DEFAULT_FPS = 30


def _video_frames(path: str):
    """Every frame of a video, decoded one at a time (a whole 1080p video would not fit in memory), with the
    stream's frame rate: yields (uint8 (H, W, 3) RGB, fps)."""
    for frame, stream in decode_video(path):
        rate = stream.average_rate
        yield frame_rgb(frame), (int(round(float(rate))) if rate else 0) or _DEFAULT_FPS


def _folder_frames(folder: str, count: int, template: str):
    for i in range(count):
        yield read_frame_folder(folder, [i], template)[0], _DEFAULT_FPS


def _prepare_one(job: Tuple) -> Tuple[int, str, Optional[str]]:
    """One clip -> (position, frame_dir, None) or (position, frame_dir, the error)."""
    position, ann, source, template, out, size, threads = job
    try:
        frames = _video_frames(source) if template is None else _folder_frames(source, ann["total_frames"], template)
        box, cropped, fps = None, [], _DEFAULT_FPS
        for frame, fps in frames:
            if box is None:
                box = person_box(ann["keypoint"], ann["img_shape"], frame.shape[:2])
            cropped.append(crop_resize_frames(frame[None], box, size)[0])
        if not cropped:
            raise DecodeError(f"{source}: no frames")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_video(out, np.stack(cropped), fps=fps, threads=threads)
        return position, ann["frame_dir"], None
    except (OSError, RuntimeError, ValueError) as e:
        return position, ann["frame_dir"], f"sample {position} ({ann['frame_dir']!r}): {e}"


def _output(out_dir: Path, frame_dir: str, suffix: str) -> Path:
    out = out_dir / (frame_dir + suffix)
    if not os.path.abspath(out).startswith(os.path.join(os.path.abspath(out_dir), "")):
        raise DataError(f"frame_dir {frame_dir!r} would write {out}, outside {out_dir}")
    return out


def prepare_videos(ann_file: PathLike, video_root: Optional[PathLike], out_dir: PathLike, video_suffix: str = ".mp4",
                   out_suffix: str = "_rgb.mp4", size: int = 224, split: Union[str, Sequence[str], None] = None,
                   workers: int = 2, progress: bool = True, skip_bad: bool = False, *,
                   frame_root: Optional[PathLike] = None, frame_template: str = "img_{:05d}.jpg") -> Dict[str, Any]:
    """Crop every clip of ``ann_file`` (``split`` of it: a split name, a list of frame_dirs, a text file of them, or
    None for all) to its persons and write it to ``out_dir`` (see the module docstring).

    Args:
        ann_file: the PoseC3D annotation pickle (its keypoints give the boxes).
        video_root / video_suffix: the raw videos, ``<video_root>/<frame_dir><video_suffix>``; or, with
            ``video_root=None``, ``frame_root`` / ``frame_template``: JPEG folders ``<frame_root>/<frame_dir>/``.
        out_dir: where the prepared videos go (created); nothing is written anywhere else.
        out_suffix: ``<out_dir>/<frame_dir><out_suffix>`` ("_rgb.mp4" as the authors' NTU videos; ".mp4" for
            the plain naming). Clips whose output exists are skipped.
        size: side of the square output frames (224); even, as H.264 in yuv420p needs.
        workers: processes (0 or 1: this one).
        skip_bad: list unreadable clips in 'failed' and go on, instead of stopping at the first with a SampleError.

    Returns a dict: 'done' (clips written), 'skipped_existing', 'failed' (list of {'frame_dir', 'error'}),
    'seconds', 'clips_per_s' (written clips per second). Raises DataFileNotFound for a missing root,
    AnnotationError for the annotations, DataError for a size H.264 cannot encode or outputs that would replace the
    inputs, and (without ``skip_bad``) SampleError for the first unreadable clip, naming it and its file.
    """
    start = time.perf_counter()
    if not isinstance(size, int) or size < 2 or size % 2:
        raise DataError(f"prepare_videos: size must be an even int >= 2 (H.264 in yuv420p), got {size!r}")
    if video_root is None and frame_root is None:
        raise ValueError("prepare_videos: give video_root (videos) or frame_root (JPEG frame folders)")
    root = Path(video_root if video_root is not None else frame_root)
    if not root.is_dir():
        raise DataFileNotFound(f"prepare_videos: {'video_root' if video_root is not None else 'frame_root'} {root} "
                                f"is not a folder")
    out_dir = Path(out_dir)
    if video_root is not None and out_suffix == video_suffix and os.path.abspath(out_dir) == os.path.abspath(root):
        raise DataError(f"prepare_videos: the outputs would replace the inputs ({root}/<frame_dir>{video_suffix}); "
                         f"choose another out_dir or out_suffix")
    annotations = load_annotations(ann_file, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = 1 if workers > 1 else 0  # x264's own threads would compete with the worker processes
    jobs, failed, skipped = [], [], 0
    for position, ann in enumerate(annotations):
        try:
            out = _output(out_dir, ann["frame_dir"], out_suffix)
        except ValueError as e:
            _fail(failed, f"sample {position} ({ann['frame_dir']!r}): {e}", ann["frame_dir"], skip_bad)
            continue
        if out.exists():
            skipped += 1
            continue
        source = str(root / (ann["frame_dir"] + video_suffix) if video_root is not None else root / ann["frame_dir"])
        jobs.append((position, ann, source, None if video_root is not None else frame_template, out, size, threads))

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(annotations), initial=skipped, desc="epamx prepare", unit="clip")
    done = 0
    try:
        if workers > 1 and len(jobs) > 1:
            with multiprocessing.get_context().Pool(min(workers, len(jobs))) as pool:
                done = _collect(pool.imap_unordered(_prepare_one, jobs), failed, skip_bad, bar)
        else:
            done = _collect(map(_prepare_one, jobs), failed, skip_bad, bar)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    return {"done": done, "skipped_existing": skipped, "failed": failed, "seconds": seconds,
            "clips_per_s": done / seconds if seconds > 0 else 0.0}


def _fail(failed: List[Dict[str, str]], message: str, frame_dir: str, skip_bad: bool) -> None:
    if not skip_bad:
        raise SampleError(message)
    log.warning("skipped %s", message)
    failed.append({"frame_dir": frame_dir, "error": message})


def _collect(results, failed: List[Dict[str, str]], skip_bad: bool, bar) -> int:
    done = 0
    for _, frame_dir, error in results:
        if error is None:
            done += 1
        else:
            _fail(failed, error, frame_dir, skip_bad)
        if bar is not None:
            bar.update()
    return done
