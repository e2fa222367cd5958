"""Videos -> a PoseC3D annotation pickle of their keypoints (``epamx keypoints``).

Each video is decoded once, in order, and handed to the estimator a chunk of frames at a time
(``video_annotation``). Videos run in parallel worker processes, each with its own estimator. Each finished video's
keypoints are written, atomically, to ``<out>.parts/`` beside the output; a killed run started again skips the videos
found there. When every video is done the parts are merged into ``out`` (written atomically) and the parts folder is
removed: ``out`` exists only whole.
"""
from __future__ import annotations

import io
import logging
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union
from urllib.parse import quote

import numpy as np

from epamx.data.annotations import dump_annotations
from epamx.data.decoding import DecodeError, decode_chunks
from epamx.errors import DataError
from epamx.pose.estimator import EstimatorFactory, PoseEstimator, check_estimate, load_estimator
from epamx.pose.videos import Video
from epamx.records import atomic_write_bytes

__all__ = ["concat_persons", "extract_keypoints", "parts_folder", "video_annotation"]

log = logging.getLogger("epamx.pose")
PathLike = Union[str, os.PathLike]
_CHUNK = 16  # frames handed to the estimator at once: a long video is never held whole


def _chunks(path: str):
    """uint8 (<= _CHUNK, H, W, 3) RGB chunks of a video's frames, in order, decoded by a thread while the estimator
    works on the previous chunk."""
    for _, frames, _ in decode_chunks(path, _CHUNK, ahead=2):
        yield frames


def concat_persons(parts: List[np.ndarray], trailing: Tuple[int, ...]) -> np.ndarray:
    """Chunks (M_i, T_i, ...) -> (max M_i, sum T_i, ...), persons a chunk lacks as zeros; ``trailing`` is the
    shape after (M, T) when there are no chunks."""
    m = max((p.shape[0] for p in parts), default=0)
    out = [np.concatenate([p, np.zeros((m - p.shape[0],) + p.shape[1:], np.float32)]) for p in parts]
    return np.concatenate(out, axis=1) if out else np.zeros((0, 0) + trailing, np.float32)


def video_annotation(path: PathLike, estimator: PoseEstimator, frame_dir: Optional[str] = None,
                     label: int = 0) -> Dict[str, Any]:
    """One video's PoseC3D annotation: frame_dir (default: the file name without suffix), label, img_shape,
    original_shape, total_frames, keypoint float32 (M, T, 17, 2) in pixels, keypoint_score float32 (M, T, 17).
    Raises DataFileNotFound or DecodeError (not a video, no frames), naming the file."""
    path = os.fspath(path)
    who = type(estimator).__name__
    joints = estimator.num_joints
    estimator.reset()
    keypoints, scores, shape, total = [], [], None, 0
    for frames in _chunks(path):
        if shape is None:
            shape = frames.shape[1:3]
        kp, sc = check_estimate(*estimator.estimate(frames), len(frames), joints, who)
        keypoints.append(kp)
        scores.append(sc)
        total += len(frames)
    if shape is None:
        raise DecodeError(f"{path}: the video has no frames")
    name = frame_dir if frame_dir is not None else Path(path).name.split(".")[0]
    return {"frame_dir": name, "label": int(label), "img_shape": tuple(map(int, shape)),
            "original_shape": tuple(map(int, shape)), "total_frames": total,
            "keypoint": concat_persons(keypoints, (joints, 2)), "keypoint_score": concat_persons(scores, (joints,))}


def parts_folder(out: PathLike) -> Path:
    """Where a run writing ``out`` keeps each finished video's keypoints until the merge."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def _part_path(parts: Path, video: Video) -> Path:
    return parts / (quote(video.frame_dir, safe="") + ".npz")


def _write_part(path: Path, ann: Dict[str, Any], video: Video) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, keypoint=ann["keypoint"], keypoint_score=ann["keypoint_score"],
             img_shape=np.array(ann["img_shape"]), total_frames=np.int64(ann["total_frames"]),
             video=np.str_(os.path.abspath(video.path)))
    atomic_write_bytes(path, buffer.getvalue())


def _read_part(path: Path, video: Video) -> Optional[Dict[str, Any]]:
    """A finished video's part, or None where there is none for this video (or it is unreadable: redone)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["video"]) != os.path.abspath(video.path):
                return None
            shape = tuple(int(s) for s in f["img_shape"])
            return {"frame_dir": video.frame_dir, "img_shape": shape, "original_shape": shape,
                    "total_frames": int(f["total_frames"]), "keypoint": f["keypoint"],
                    "keypoint_score": f["keypoint_score"]}
    except (OSError, ValueError, KeyError) as e:
        log.warning("redoing %s: its partial result %s is unreadable (%s)", video.path, path, e)
        return None


_worker_estimator: Optional[PoseEstimator] = None


def _init_worker(factory: EstimatorFactory) -> None:
    global _worker_estimator
    _worker_estimator = factory()


def _run_one(job: Tuple[int, Video, str]) -> Tuple[int, Optional[DataError]]:
    """One video -> its part file; (position, None) or (position, the DataError that names the bad video)."""
    position, video, part = job
    try:
        ann = video_annotation(video.path, _worker_estimator, video.frame_dir)
    except DataError as e:
        return position, e
    _write_part(Path(part), ann, video)
    return position, None


def _run(jobs: List[Tuple[int, Video, str]], factory: EstimatorFactory, workers: int, bar):
    """Yield (position, error or None) as videos finish."""
    if workers > 1 and len(jobs) > 1:
        # fresh processes: forking one whose threads (torch's OpenMP pool, an estimator's) have run can deadlock
        context = multiprocessing.get_context("spawn")
        with context.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(factory,)) as pool:
            yield from pool.imap_unordered(_run_one, jobs)
        return
    _init_worker(factory)
    try:
        for job in jobs:
            yield _run_one(job)
    finally:
        _worker_estimator.close()


def extract_keypoints(videos: Sequence[Video], out: PathLike, estimator: Optional[EstimatorFactory] = None,
                      labels: Optional[Dict[str, int]] = None, classes: Optional[Sequence[str]] = None,
                      splits: Optional[Dict[str, List[str]]] = None, workers: int = 1, progress: bool = True,
                      skip_bad: bool = False) -> Dict[str, Any]:
    """Every video's keypoints, by ``estimator`` (a picklable callable returning a PoseEstimator, made once per
    worker; default MediaPipePose), written to ``out`` as a PoseC3D annotation pickle (see the module docstring).

    ``labels`` ({frame_dir: label}, default 0), ``classes`` (the names stored as 'classes') and ``splits``
    ({name: [frame_dir, ...]}, default {'all': every video}) are stored with them. Without ``skip_bad`` the first
    unreadable video raises its DataError (DecodeError, DataFileNotFound), naming it, and the videos done so far
    stay in the parts folder for the next run; with it, such videos are left out and listed.

    Returns {'out', 'done' (videos estimated now), 'resumed' (found done), 'failed' ([{'video', 'error'}]),
    'seconds', 'frames', 'frames_per_s' (frames estimated now per second)}.
    """
    estimator = estimator or load_estimator("mediapipe")
    if not videos:
        raise DataError("no videos to estimate keypoints for")
    start = time.perf_counter()
    out = Path(out)
    parts = parts_folder(out)
    parts.mkdir(parents=True, exist_ok=True)
    paths = [_part_path(parts, v) for v in videos]
    jobs = [(i, v, os.fspath(p)) for i, (v, p) in enumerate(zip(videos, paths)) if _read_part(p, v) is None]
    failed: List[Dict[str, str]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(videos), initial=len(videos) - len(jobs), desc="epamx: keypoints", unit="video")
    try:
        for position, error in _run(jobs, estimator, workers, bar):
            if bar is not None:
                bar.update()
            if error is not None:
                if not skip_bad:
                    raise error
                log.warning("skipped %s", error)
                failed.append({"video": videos[position].path, "error": str(error)})
    finally:
        if bar is not None:
            bar.close()
    bad = {f["video"] for f in failed}
    annotations, frames_now = [], 0
    redone = {job[1].frame_dir for job in jobs}
    for video, path in zip(videos, paths):
        if video.path in bad:
            continue
        ann = _read_part(path, video)
        if ann is None:
            raise DataError(f"{path}: the keypoints of {video.path} were not written; run the command again")
        ann["label"] = int((labels or {}).get(video.frame_dir, 0))
        annotations.append(ann)
        frames_now += ann["total_frames"] if video.frame_dir in redone else 0
    kept = {a["frame_dir"] for a in annotations}
    split = {name: [n for n in names if n in kept] for name, names in
             (splits or {"all": [v.frame_dir for v in videos]}).items()}
    dump_annotations(out, annotations, split, classes)
    shutil.rmtree(parts, ignore_errors=True)
    seconds = time.perf_counter() - start
    return {"out": os.fspath(out), "done": len(jobs) - len(failed), "resumed": len(videos) - len(jobs),
            "failed": failed, "seconds": seconds, "frames": frames_now,
            "frames_per_s": frames_now / seconds if seconds > 0 else 0.0}
