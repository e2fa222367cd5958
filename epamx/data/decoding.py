"""RGB frames from videos (PyAV, which bundles FFmpeg) and from folders of JPEG frames (Pillow), and the writers
of both. Frames are uint8 (T, H, W, 3) RGB. A missing file raises DataFileNotFound, an unreadable one DecodeError,
both naming the file; a video is decoded once, in order, up to the last frame asked for (docs/performance.md).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator, Sequence, Tuple, Union

import numpy as np

from epamx.errors import DataError, DataFileNotFound

__all__ = ["SHORT_VIDEO_TOLERANCE", "DecodeError", "decode_chunks", "decode_video", "frame_rgb", "read_frame_folder",
           "read_video", "video_frame_count", "write_frame_folder", "write_video", "write_video_stream"]

PathLike = Union[str, os.PathLike]
# A video may end a few frames before the annotation's total_frames (NTU's videos and skeletons disagree by a frame
# or two now and then): sampled frames past its end repeat its last frame, up to this fraction of the video.
SHORT_VIDEO_TOLERANCE = 0.1


class DecodeError(DataError):
    """A video or frame could not be read; the message names the file."""


def _needed(indices: Sequence[int]) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1 or idx.size == 0:
        raise ValueError(f"frame indices must be a non-empty 1-D sequence, got shape {idx.shape}")
    if idx.min() < 0:
        raise ValueError(f"frame indices must be >= 0, got {int(idx.min())}")
    return idx


_converters = threading.local()
_CONVERT_OPTIONS = {"threads": 1}  # emptied on PyAV < 17, which has no `threads` (its conversion is single-threaded)


def frame_rgb(frame) -> np.ndarray:
    """A decoded av.VideoFrame as uint8 (H, W, 3) RGB, as ``frame.to_ndarray(format="rgb24")`` gives it, but
    converted on the calling thread alone, by a converter of that thread's own.

    PyAV's own conversion runs on a pool of threads, one per core (PyAV >= 17), and PyAV 19 keeps one such
    converter per thread for the process's life. A process forked after a conversion (a DataLoader worker, a
    `prepare` worker) inherits that converter but not its threads, and its first conversion then waits for them
    forever. A single thread is also what a loader worker wants: the workers are the parallelism, and a pool per
    worker would oversubscribe the cores. The pixels are the same either way."""
    reformatter = getattr(_converters, "reformatter", None)
    if reformatter is None:
        from av.video.reformatter import VideoReformatter

        reformatter = _converters.reformatter = VideoReformatter()
    try:
        rgb = reformatter.reformat(frame, format="rgb24", **_CONVERT_OPTIONS)
    except TypeError:
        if not _CONVERT_OPTIONS:
            raise
        _CONVERT_OPTIONS.clear()
        rgb = reformatter.reformat(frame, format="rgb24")
    return rgb.to_ndarray()


def decode_video(path: PathLike) -> Iterator[Tuple[object, object]]:
    """The frames of a video's first video stream, decoded in order: yields (av.VideoFrame, its stream). Errors
    while opening or decoding become DecodeError (DataFileNotFound for a missing file), naming the file."""
    import av

    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataFileNotFound(f"video {path} does not exist")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                yield frame, stream
    except (av.error.FFmpegError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise DataFileNotFound(f"video {path} does not exist") from e
        raise DecodeError(f"{path}: cannot decode video ({type(e).__name__}: {e}); the file may be corrupt or "
                          f"truncated") from e


def decode_chunks(path: PathLike, chunk: int = 16, ahead: int = 2) -> Iterator[Tuple[int, np.ndarray, object]]:
    """A video's frames in order as (index of the chunk's first frame, uint8 (<= chunk, H, W, 3) RGB, the stream),
    decoded by a thread of its own at most ``ahead`` chunks before the caller (PyAV releases the GIL while it
    decodes, so decoding overlaps whatever the caller does with the previous chunk). Errors as decode_video's."""
    import queue
    import threading

    out: "queue.Queue" = queue.Queue(ahead)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def decode() -> None:
        try:
            frames, first, stream = [], 0, None
            for frame, stream in decode_video(path):
                frames.append(frame_rgb(frame))
                if len(frames) == chunk:
                    if not put((first, np.stack(frames), stream)):
                        return
                    first += len(frames)
                    frames = []
            if frames:
                put((first, np.stack(frames), stream))
            put(None)
        except BaseException as e:  # handed to the caller, which raises it
            put(e)

    thread = threading.Thread(target=decode, name="epamx-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def read_video(path: PathLike, indices: Sequence[int]) -> np.ndarray:
    """Frames ``indices`` (0-based, any order, repeats allowed) of a video -> uint8 (len(indices), H, W, 3) RGB.
    Frames a little past the video's end (up to a tenth of it) repeat its last frame. Raises DataFileNotFound or
    DecodeError naming the file, ValueError for empty or negative indices."""
    path = os.fspath(path)
    idx = _needed(indices)
    wanted = set(idx.tolist())
    last = int(idx.max())
    frames = {}
    decoded = 0
    previous = None
    frames_in = decode_video(path)
    for frame, _ in frames_in:
        if decoded in wanted:
            frames[decoded] = frame_rgb(frame)
        previous = frame
        decoded += 1
        if decoded > last:
            frames_in.close()  # stop decoding: every frame asked for is in
            break
    if decoded <= last and previous is not None and decoded >= (1 - SHORT_VIDEO_TOLERANCE) * (last + 1):
        tail = frame_rgb(previous)
        for i in range(decoded, last + 1):
            if i in wanted:
                frames[i] = tail
    missing = [i for i in wanted if i not in frames]
    if missing:
        raise DecodeError(f"{path}: the video has {decoded} readable frames, but frame {max(missing)} was asked for "
                          f"(does the annotation's total_frames match the video?)")
    return np.stack([frames[i] for i in idx.tolist()])


def video_frame_count(path: PathLike) -> int:
    """Frames in a video, counted by decoding it (container metadata is often missing or wrong). Raises
    DataFileNotFound or DecodeError, naming the file."""
    return sum(1 for _ in decode_video(path))


def read_frame_folder(folder: PathLike, indices: Sequence[int], template: str = "img_{:05d}.jpg") -> np.ndarray:
    """Frames ``indices`` (0-based) from ``folder/template.format(index + 1)`` (mmaction's img_00001.jpg naming)
    -> uint8 (len(indices), H, W, 3) RGB. Raises DataFileNotFound (the folder or a frame) or DecodeError (an
    unreadable image, frames of different sizes), naming the file."""
    from PIL import Image, UnidentifiedImageError

    idx = _needed(indices)
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFileNotFound(f"frame folder {folder} does not exist")
    cache = {}
    out = []
    for i in idx.tolist():
        if i not in cache:
            path = folder / template.format(i + 1)
            try:
                with Image.open(path) as img:
                    cache[i] = np.asarray(img.convert("RGB"))
            except FileNotFoundError as e:
                raise DataFileNotFound(f"frame {path} does not exist (frame {i} of {folder}, template "
                                       f"{template!r})") from e
            except (UnidentifiedImageError, OSError, SyntaxError) as e:
                raise DecodeError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
        out.append(cache[i])
    shapes = {f.shape for f in out}
    if len(shapes) != 1:
        raise DecodeError(f"{folder}: frames of different sizes {sorted(shapes)}")
    return np.stack(out)


def write_video(path: PathLike, frames: np.ndarray, fps: float = 30, crf: int = 18, preset: str = "veryfast",
                threads: int = 0) -> None:
    """uint8 (T, H, W, 3) RGB frames -> an H.264 video (yuv420p; H and W even; any container FFmpeg knows from the
    suffix). ``crf``/``preset``: x264's quality and speed; ``threads``: encoder threads (0: x264 decides). Written
    to a temporary name and renamed, so a killed writer never leaves a truncated file behind. Raises ValueError for
    frames of another dtype or shape, or an odd side."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"write_video: frames must be uint8 (T, H, W, 3) with T >= 1, got {frames.dtype} "
                         f"{frames.shape}")
    write_video_stream(path, iter(frames), fps, crf, preset, threads)


def write_video_stream(path: PathLike, frames: Iterator[np.ndarray], fps: float = 30, crf: int = 18,
                       preset: str = "veryfast", threads: int = 0) -> int:
    """:func:`write_video` of frames given one at a time (uint8 (H, W, 3) RGB, all of one even size), so a long video
    is never held whole. Returns the frame count; raises ValueError for no frames or a frame unlike the first."""
    from fractions import Fraction

    import av

    first = next(frames, None)
    if first is None or first.ndim != 3 or first.shape[-1] != 3 or first.dtype != np.uint8:
        raise ValueError("write_video: frames must be uint8 (H, W, 3), at least one")
    h, w = first.shape[:2]
    if h % 2 or w % 2:
        raise ValueError(f"write_video: H.264 with yuv420p needs an even height and width, got {h}x{w}")
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    count = 0
    try:
        with av.open(os.fspath(tmp), mode="w") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = w, h
            stream.pix_fmt = "yuv420p"
            # mbtree off: with it, x264's output varies from run to run (its lookahead reads memory it did not
            # write), and the embedded dataset must be the same on every machine.
            stream.options = {"crf": str(crf), "preset": preset, "threads": str(threads), "x264-params": "mbtree=0"}
            for frame in _prepend(first, frames):
                if frame.shape != first.shape or frame.dtype != np.uint8:
                    raise ValueError(f"write_video: frame {count} is {frame.dtype} {frame.shape}, the first "
                                     f"{first.shape}")
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
                count += 1
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return count


def _prepend(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def write_frame_folder(folder: PathLike, frames: np.ndarray, template: str = "img_{:05d}.jpg",
                       quality: int = 95) -> None:
    """uint8 (T, H, W, 3) RGB frames -> ``folder/template.format(i + 1)`` JPEG files."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(np.asarray(frames)):
        Image.fromarray(frame).save(folder / template.format(i + 1), quality=quality)
