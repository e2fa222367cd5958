"""prepare_videos: the authors' offline crop (one persons' box per video, every frame cropped and resized), written
atomically, resumable after a kill, with errors that name the sample and the file."""
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from epamx.data import ClipDataset, SampleError, load_annotations, read_video, write_frame_folder, write_video
from epamx.data.decoding import video_frame_count
from epamx.data.prepare import prepare_videos
from epamx.errors import DataError, DataFileNotFound
from fakes import make_annotation, smooth_frames, write_pickle
from references import mmcompact_box, pil_crop_resize

LENGTHS = [9, 14, 11]


def raw_dataset(root, lengths=LENGTHS, img_shape=(48, 64), video_shape=(48, 64), frames=False):
    """Raw videos (or JPEG folders) of video_shape with annotations in img_shape pixels; returns the ann file."""
    rng = np.random.RandomState(len(lengths))
    anns = []
    media = root / ("frames" if frames else "videos")
    media.mkdir(parents=True)
    for i, length in enumerate(lengths):
        ann = make_annotation(rng, f"S001C00{i}P001", i, persons=2, frames=length, img_shape=img_shape)
        anns.append(ann)
        pictures = smooth_frames(length, *video_shape, seed=i)
        if frames:
            write_frame_folder(media / ann["frame_dir"], pictures)
        else:
            write_video(media / f"{ann['frame_dir']}.mp4", pictures)
    return write_pickle(root / "ann.pkl", {"split": {"first": [anns[0]["frame_dir"], anns[2]["frame_dir"]]},
                                           "annotations": anns})


def expected_frames(ann, source_frames, size):
    h, w = ann["img_shape"]
    box = mmcompact_box(ann["keypoint"], (h, w))
    sy, sx = source_frames.shape[1] / h, source_frames.shape[2] / w
    return pil_crop_resize(source_frames, (int(box[0] * sx), int(box[1] * sy), int(box[2] * sx), int(box[3] * sy)),
                           size)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_frame_is_cropped_to_the_persons(tmp_path, workers):
    ann_file = raw_dataset(tmp_path, img_shape=(96, 128))  # the keypoints in twice the video's resolution
    out = tmp_path / "out"
    result = prepare_videos(ann_file, tmp_path / "videos", out, size=32, workers=workers, progress=False)
    assert result["done"] == 3 and result["skipped_existing"] == 0 and result["failed"] == []
    assert result["clips_per_s"] > 0 and result["seconds"] > 0
    anns = load_annotations(ann_file)
    assert sorted(os.listdir(out)) == sorted(f"{a['frame_dir']}_rgb.mp4" for a in anns)
    for ann, length in zip(anns, LENGTHS):
        path = out / f"{ann['frame_dir']}_rgb.mp4"
        assert video_frame_count(path) == length
        got = read_video(path, range(length))
        assert got.shape == (length, 32, 32, 3)
        reference = expected_frames(ann, read_video(tmp_path / "videos" / f"{ann['frame_dir']}.mp4", range(length)), 32)
        assert np.abs(got.astype(np.int64) - reference).mean() < 5


def test_prepared_videos_give_the_clips_the_raw_ones_do(tmp_path):
    """ClipDataset on the prepared videos (precropped) sees what it sees cropping the raw ones itself."""
    ann_file = raw_dataset(tmp_path)
    prepare_videos(ann_file, tmp_path / "videos", tmp_path / "out", out_suffix=".mp4", size=32, workers=0,
                   progress=False)
    anns = load_annotations(ann_file)
    raw = ClipDataset(anns, ["a", "b", "c"], train=False, video_root=str(tmp_path / "videos"), rgb_precropped=False,
                      clip_len=6, frame_size=32)
    prepared = ClipDataset(anns, ["a", "b", "c"], train=False, video_root=str(tmp_path / "out"), clip_len=6,
                           frame_size=32)
    for i in range(len(anns)):
        assert np.abs(raw[i]["imgs"].numpy().astype(np.int64) - prepared[i]["imgs"].numpy()).mean() < 5


def test_frame_folders_as_input(tmp_path):
    ann_file = raw_dataset(tmp_path, frames=True)
    result = prepare_videos(ann_file, None, tmp_path / "out", size=16, workers=0, progress=False,
                            frame_root=tmp_path / "frames", split="first")
    assert result["done"] == 2
    ann = load_annotations(ann_file, "first")[1]
    got = read_video(tmp_path / "out" / f"{ann['frame_dir']}_rgb.mp4", range(11))
    from epamx.data import read_frame_folder

    reference = expected_frames(ann, read_frame_folder(tmp_path / "frames" / ann["frame_dir"], range(11)), 16)
    assert np.abs(got.astype(np.int64) - reference).mean() < 5


def test_existing_outputs_are_skipped_and_leftovers_ignored(tmp_path):
    ann_file = raw_dataset(tmp_path)
    out = tmp_path / "out"
    first = prepare_videos(ann_file, tmp_path / "videos", out, size=16, split="first", workers=0, progress=False)
    assert first["done"] == 2
    stamps = {name: os.stat(out / name).st_mtime_ns for name in os.listdir(out)}
    leftover = out / ".S001C001P001_rgb.tmp99999.mp4"  # what a writer killed mid-clip leaves
    leftover.write_bytes(b"half a video")
    again = prepare_videos(ann_file, tmp_path / "videos", out, size=16, workers=2, progress=True)
    assert again["done"] == 1 and again["skipped_existing"] == 2 and again["failed"] == []
    assert {name: os.stat(out / name).st_mtime_ns for name in stamps} == stamps
    assert video_frame_count(out / "S001C001P001_rgb.mp4") == LENGTHS[1]
    assert prepare_videos(ann_file, tmp_path / "videos", out, size=16, workers=2, progress=False)["done"] == 0


_SLOW_PREPARE = """
import sys, time
import epamx.data.prepare as prepare

real = prepare.write_video


def slow(*args, **kwargs):
    real(*args, **kwargs)
    print("wrote", flush=True)
    time.sleep(0.3)


prepare.write_video = slow
prepare.prepare_videos(sys.argv[1], sys.argv[2], sys.argv[3], size=16, workers=1, progress=False)
"""


def test_a_killed_run_resumes_with_nothing_lost(tmp_path):
    lengths = [6, 7, 8, 9, 10, 11]
    ann_file = raw_dataset(tmp_path, lengths)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_PREPARE, str(ann_file), str(tmp_path / "videos"), str(out)],
                            stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline() == b"wrote\n"
        assert proc.stdout.readline() == b"wrote\n"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
    written = sorted(os.listdir(out))
    assert 2 <= len(written) < len(lengths)
    result = prepare_videos(ann_file, tmp_path / "videos", out, size=16, workers=2, progress=False)
    assert result["skipped_existing"] == len(written) and result["done"] == len(lengths) - len(written)
    for ann, length in zip(load_annotations(ann_file), lengths):
        assert video_frame_count(out / f"{ann['frame_dir']}_rgb.mp4") == length


def test_bad_clips_are_errors_or_skipped_and_listed(tmp_path):
    ann_file = raw_dataset(tmp_path, [8, 9, 10, 11])
    videos = tmp_path / "videos"
    os.remove(videos / "S001C001P001.mp4")
    data = (videos / "S001C003P001.mp4").read_bytes()
    (videos / "S001C003P001.mp4").write_bytes(data[: len(data) // 3])
    with pytest.raises(SampleError, match=re.escape("sample 1 ('S001C001P001'): ") + ".*"
                       + re.escape(str(videos / "S001C001P001.mp4"))):
        prepare_videos(ann_file, videos, tmp_path / "out", size=16, workers=0, progress=False)
    with pytest.raises(SampleError, match="sample [13] "):
        prepare_videos(ann_file, videos, tmp_path / "out2", size=16, workers=2, progress=False)
    result = prepare_videos(ann_file, videos, tmp_path / "out3", size=16, workers=2, progress=False, skip_bad=True)
    assert result["done"] == 2
    failed = {f["frame_dir"]: f["error"] for f in result["failed"]}
    assert sorted(failed) == ["S001C001P001", "S001C003P001"]
    assert str(videos / "S001C003P001.mp4") in failed["S001C003P001"]
    assert sorted(os.listdir(tmp_path / "out3")) == ["S001C000P001_rgb.mp4", "S001C002P001_rgb.mp4"]


def test_nothing_is_written_outside_out_dir(tmp_path):
    rng = np.random.RandomState(0)
    anns = [make_annotation(rng, "../escape", 0, frames=6), make_annotation(rng, "nested/clip", 1, frames=6)]
    (tmp_path / "videos" / "nested").mkdir(parents=True)
    for ann in anns:
        write_video(tmp_path / "videos" / f"{ann['frame_dir']}.mp4", smooth_frames(6, 48, 64))
    ann_file = write_pickle(tmp_path / "ann.pkl", anns)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SampleError, match=re.escape("'../escape'") + ".*outside"):
        prepare_videos(ann_file, tmp_path / "videos", tmp_path / "out", size=16, workers=0, progress=False)
    result = prepare_videos(ann_file, tmp_path / "videos", tmp_path / "out", size=16, workers=0, progress=False,
                            skip_bad=True)
    assert result["done"] == 1 and [f["frame_dir"] for f in result["failed"]] == ["../escape"]
    assert (tmp_path / "out" / "nested" / "clip_rgb.mp4").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["out"])


def test_bad_arguments(tmp_path):
    ann_file = raw_dataset(tmp_path)
    with pytest.raises(DataError, match="even"):
        prepare_videos(ann_file, tmp_path / "videos", tmp_path / "out", size=33)
    with pytest.raises(ValueError, match="video_root .* or frame_root"):
        prepare_videos(ann_file, None, tmp_path / "out")
    with pytest.raises(DataFileNotFound, match="video_root"):
        prepare_videos(ann_file, tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(DataError, match="replace the inputs"):
        prepare_videos(ann_file, tmp_path / "videos", tmp_path / "videos", out_suffix=".mp4")
    assert not (tmp_path / "out").exists()
