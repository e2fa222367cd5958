"""Videos (PyAV) and JPEG folders: round trips, frame selection in any order, and errors that name the file."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from epamx.data import DecodeError, read_frame_folder, read_video, write_frame_folder, write_video
from epamx.data.decoding import decode_video, frame_rgb, video_frame_count
from epamx.errors import DataError, DataFileNotFound
from fakes import frame_numbers, numbered_frames, smooth_frames


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_video_round_trip(tmp_path, suffix):
    frames = smooth_frames(9, 38, 54, seed=len(suffix))
    path = tmp_path / f"clip{suffix}"
    write_video(path, frames)
    assert video_frame_count(path) == 9
    got = read_video(path, range(9))
    assert got.shape == frames.shape and got.dtype == np.uint8
    error = np.abs(got.astype(np.int64) - frames).mean()
    assert error < 5, f"mean abs error {error:.2f} grey levels"  # yuv420p and crf 18 on a tiny picture


def test_any_order_with_repeats_returns_just_those_frames(tmp_path):
    path = tmp_path / "numbered.mp4"
    write_video(path, numbered_frames(23, 32, 48))
    every = read_video(path, range(23))
    assert frame_numbers(every) == list(range(23))
    for indices in ([7], [22, 0, 7, 7, 3, 22], [5, 4, 3, 2, 1, 0], np.array([11, 11, 11])):
        got = read_video(path, indices)
        assert got.shape == (len(indices), 32, 48, 3)
        np.testing.assert_array_equal(got, every[list(indices)])
        assert frame_numbers(got) == list(indices)


def test_a_video_a_frame_or_two_short_repeats_its_last_frame(tmp_path):
    path = tmp_path / "short.mp4"
    write_video(path, numbered_frames(20))
    got = read_video(path, [3, 19, 20, 21])  # the annotation says 22 frames; the video has 20
    assert frame_numbers(got) == [3, 19, 19, 19]


def test_frames_past_the_end_are_an_error_naming_the_file(tmp_path):
    path = tmp_path / "short.mp4"
    write_video(path, numbered_frames(20))
    with pytest.raises(DecodeError, match=re.escape(f"{path}: the video has 20 readable frames, but frame 30 was "
                                                    "asked for")):
        read_video(path, [0, 30])


def test_bad_indices(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, numbered_frames(4))
    with pytest.raises(ValueError, match=">= 0"):
        read_video(path, [1, -1])
    with pytest.raises(ValueError, match="non-empty"):
        read_video(path, [])


def test_missing_truncated_and_garbage_videos(tmp_path):
    with pytest.raises(DataFileNotFound, match=re.escape(str(tmp_path / "none.mp4"))):
        read_video(tmp_path / "none.mp4", [0])
    with pytest.raises(DataFileNotFound, match=re.escape(str(tmp_path / "none.mp4"))):
        video_frame_count(tmp_path / "none.mp4")
    for suffix in (".mp4", ".mkv"):
        path = tmp_path / f"clip{suffix}"
        write_video(path, smooth_frames(16, 32, 32))
        data = path.read_bytes()
        for cut in (0.3, 0.6):
            path.write_bytes(data[:int(len(data) * cut)])
            with pytest.raises(DecodeError, match=re.escape(str(path))):
                read_video(path, range(16))
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.RandomState(0).bytes(3000))
    with pytest.raises(DecodeError, match=re.escape(str(garbage)) + ".*corrupt or truncated") as info:
        read_video(garbage, [0])
    assert isinstance(info.value, DataError) and info.value.__cause__ is not None, "the decoder's error is kept"
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(DecodeError, match=re.escape(str(empty))):
        read_video(empty, [0])
    with pytest.raises(DecodeError, match=re.escape(str(garbage))):
        video_frame_count(garbage)


def test_write_video_checks_its_input(tmp_path):
    with pytest.raises(ValueError, match="even height and width, got 31x32"):
        write_video(tmp_path / "odd.mp4", np.zeros((3, 31, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "float.mp4", np.zeros((3, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="T >= 1"):
        write_video(tmp_path / "none.mp4", np.zeros((0, 32, 32, 3), np.uint8))
    assert os.listdir(tmp_path) == []


def test_a_failing_writer_leaves_nothing(tmp_path, monkeypatch):
    import av

    class Failing:
        calls = 0

        @staticmethod
        def from_ndarray(frame, format):
            Failing.calls += 1
            if Failing.calls == 5:
                raise OSError("disk full")
            return av.video.frame.VideoFrame.from_ndarray(frame, format=format)

    monkeypatch.setattr(av, "VideoFrame", Failing)
    path = tmp_path / "clip.mp4"
    with pytest.raises(OSError, match="disk full"):
        write_video(path, numbered_frames(12))
    assert os.listdir(tmp_path) == []


_SLOW_WRITER = """
import sys, time
import av
from epamx.data import write_video
from fakes import numbered_frames

real = av.VideoFrame


class Slow:
    @staticmethod
    def from_ndarray(frame, format):
        print("writing", flush=True)
        time.sleep(0.05)
        return real.from_ndarray(frame, format=format)


av.VideoFrame = Slow
write_video(sys.argv[1], numbered_frames(200))
"""


def test_a_killed_writer_leaves_no_file_under_the_final_name(tmp_path):
    pytest.importorskip("av", reason="needs PyAV (av), which is not installed")  # the writer runs in a child process
    path = tmp_path / "clip.mp4"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__)] + sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(path)], stdout=subprocess.PIPE, env=env)
    try:
        for _ in range(10):  # a few frames into the video
            assert proc.stdout.readline() == b"writing\n"
        deadline = time.monotonic() + 30
        while not any(name.endswith(".mp4") for name in os.listdir(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not path.exists()
    leftovers = os.listdir(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".clip.tmp"), leftovers
    with pytest.raises(FileNotFoundError):
        read_video(path, [0])
    write_video(path, numbered_frames(6))  # a later writer is not bothered by the leftover
    assert frame_numbers(read_video(path, range(6))) == list(range(6))


@pytest.mark.parametrize("template,exact", [("img_{:05d}.jpg", False), ("frame-{:03d}.png", True)])
def test_frame_folder_round_trip(tmp_path, template, exact):
    frames = smooth_frames(7, 26, 34, seed=3)
    folder = tmp_path / "S001C001P001R001A001"
    write_frame_folder(folder, frames, template)
    assert sorted(os.listdir(folder)) == [template.format(i) for i in range(1, 8)]
    got = read_frame_folder(folder, range(7), template)
    assert got.shape == frames.shape and got.dtype == np.uint8
    if exact:
        np.testing.assert_array_equal(got, frames)
    else:
        assert np.abs(got.astype(np.int64) - frames).mean() < 2
    picked = read_frame_folder(folder, [6, 0, 6, 2], template)
    np.testing.assert_array_equal(picked, got[[6, 0, 6, 2]])


def test_mmaction_naming_is_one_based(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    from PIL import Image

    for i, frame in enumerate(numbered_frames(5)):
        Image.fromarray(frame).save(folder / f"img_{i + 1:05d}.jpg", quality=95)
    assert frame_numbers(read_frame_folder(folder, [0, 4, 2])) == [0, 4, 2]


def test_frame_folder_errors(tmp_path):
    folder = tmp_path / "clip"
    write_frame_folder(folder, numbered_frames(4))
    with pytest.raises(DataFileNotFound, match=re.escape(str(tmp_path / "nowhere"))):
        read_frame_folder(tmp_path / "nowhere", [0])
    with pytest.raises(DataFileNotFound, match=re.escape(str(folder / "img_00005.jpg")) + ".*frame 4"):
        read_frame_folder(folder, [0, 4])
    bad = folder / "img_00002.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DecodeError, match=re.escape(str(bad)) + ": cannot read image"):
        read_frame_folder(folder, [0, 1])
    data = (folder / "img_00003.jpg").read_bytes()
    (folder / "img_00003.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError, match=re.escape(str(folder / "img_00003.jpg"))):
        read_frame_folder(folder, [2])
    write_frame_folder(folder, numbered_frames(1, 16, 16), "img_{:05d}.jpg")  # frame 1 now a different size
    with pytest.raises(DecodeError, match="different sizes"):
        read_frame_folder(folder, [0, 3])


def test_frame_rgb_gives_pyavs_pixels_on_the_calling_thread_alone(tmp_path):
    av = pytest.importorskip("av", reason="needs PyAV (av), which is not installed")
    path = tmp_path / "clip.mp4"
    write_video(path, smooth_frames(3, 242, 326, seed=3))  # rows and columns not a multiple of 16 or 4
    frames = [frame for frame, _ in decode_video(path)]
    tasks = lambda: len(os.listdir("/proc/self/task"))  # noqa: E731
    got, started = [], []

    def convert():  # on a new thread: PyAV 19 keeps a converter, and its threads, per thread
        for frame in frames:
            before = tasks()
            got.append(frame_rgb(frame))
            started.append(tasks() - before)

    thread = threading.Thread(target=convert)
    thread.start()
    thread.join()
    assert started == [0] * len(frames), f"PyAV {av.__version__}: converting frames started {started} threads"
    for frame, rgb in zip(frames, got):
        assert rgb.dtype == np.uint8 and rgb.shape == (242, 326, 3)
        np.testing.assert_array_equal(rgb, frame.to_ndarray(format="rgb24"))


# A parent that has converted frames, PyAV's way and epamx's, then forks a reader (as a DataLoader's workers or
# `prepare`'s are made). With PyAV 19's one converter per thread, kept with its worker threads, the child's first
# PyAV conversion waits forever for threads it does not have.
_FORKED_READER = """
import multiprocessing, sys
from epamx.data import read_video
from epamx.data.decoding import decode_video, frame_rgb
for frame, _ in decode_video(sys.argv[1]):
    frame.to_ndarray(format="rgb24"), frame_rgb(frame)
child = multiprocessing.get_context("fork").Process(target=read_video, args=(sys.argv[1], [0, 5]))
child.start()
child.join(60)
if child.exitcode is None:
    child.kill()
    sys.exit("the forked reader hung")
sys.exit(child.exitcode)
"""


def test_a_process_forked_after_conversions_still_reads_videos(tmp_path):
    pytest.importorskip("av", reason="needs PyAV (av), which is not installed")
    path = tmp_path / "clip.mp4"
    write_video(path, smooth_frames(6, 480, 640, seed=1))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__)] + sys.path)}
    done = subprocess.run([sys.executable, "-c", _FORKED_READER, str(path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
