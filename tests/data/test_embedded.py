"""The embedded dataset: generated deterministically, cached, in the real formats, readable by the real input path;
and the design property that the pose stream cannot tell its RGB-only pairs apart."""
import os

import numpy as np
import pytest
import torch

from epamx.data import (
    BatchTransform,
    DataConfig,
    EmbeddedConfig,
    build_dataset,
    build_embedded,
    build_loader,
    load_annotations,
    read_frame_folder,
    read_video,
)
from epamx.data.embedded import CLASSES, embedded_dir
from epamx.data.scenes import render_clip
from epamx.errors import DataError

TINY = EmbeddedConfig(train_per_class=2, val_per_class=1, frames=12, image_size=32)


def config(cache, **embedded):
    return DataConfig(cache_dir=str(cache), clip_len=12, frame_size=32, embedded=EmbeddedConfig(
        **{**TINY.__dict__, **embedded}))


def test_generation_is_deterministic(tmp_path):
    first = build_embedded(config(tmp_path / "a"), progress=False, workers=1)
    second = build_embedded(config(tmp_path / "b"), progress=False, workers=2)
    a, b = load_annotations(first["ann_file"]), load_annotations(second["ann_file"])
    assert len(a) == len(CLASSES) * 3
    for x, y in zip(a, b):
        assert x["frame_dir"] == y["frame_dir"] and x["label"] == y["label"]
        np.testing.assert_array_equal(x["keypoint"], y["keypoint"])
        np.testing.assert_array_equal(x["keypoint_score"], y["keypoint_score"])
    for ann in a[:: len(CLASSES) - 1]:
        frames_a = read_video(os.path.join(first["video_root"], ann["frame_dir"] + ".mp4"), range(12))
        frames_b = read_video(os.path.join(second["video_root"], ann["frame_dir"] + ".mp4"), range(12))
        # The rendered frames are the same; x264 (SIMD, with mb-tree) encodes tiny frames a little differently from
        # run to run, about 2 grey levels on average.
        assert np.abs(frames_a.astype(np.int64) - frames_b).mean() < 4
    other = build_embedded(config(tmp_path / "a", seed=1), progress=False, workers=1)
    assert other["root"] != first["root"]
    assert not np.array_equal(load_annotations(other["ann_file"])[0]["keypoint"], a[0]["keypoint"])


def test_splits_labels_and_classes(tmp_path):
    paths = build_embedded(config(tmp_path), progress=False, workers=1)
    train = load_annotations(paths["ann_file"], "train")
    val = load_annotations(paths["ann_file"], "val")
    assert [a["label"] for a in train] == [i % len(CLASSES) for i in range(2 * len(CLASSES))]
    assert [a["label"] for a in val] == list(range(len(CLASSES)))
    assert not {a["frame_dir"] for a in train} & {a["frame_dir"] for a in val}
    for ann in train + val:
        assert ann["total_frames"] == 12 and ann["img_shape"] == (32, 32)
        assert ann["keypoint"].shape[1:] == (12, 17, 2) and ann["keypoint"].shape[0] in (1, 2)
        assert CLASSES[ann["label"]] in ann["frame_dir"]


def test_the_cache_is_reused(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    paths = build_embedded(cfg, progress=False, workers=1)
    video = os.path.join(paths["video_root"], os.listdir(paths["video_root"])[0])
    stamps = os.stat(paths["ann_file"]).st_mtime_ns, os.stat(video).st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("regenerated")

    monkeypatch.setattr("epamx.data.embedded.render_clip", fail)
    assert build_embedded(cfg, progress=False, workers=1) == paths
    assert (os.stat(paths["ann_file"]).st_mtime_ns, os.stat(video).st_mtime_ns) == stamps
    assert os.listdir(tmp_path) == [os.path.basename(paths["root"])], "no temporary folder left behind"


def test_the_cache_folder_follows_epamx_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EPAMX_CACHE", str(tmp_path / "env"))
    cfg = DataConfig(embedded=TINY)
    assert embedded_dir(cfg).parent == tmp_path / "env"
    assert embedded_dir(DataConfig(cache_dir=str(tmp_path / "cfg"), embedded=TINY)).parent == tmp_path / "cfg"
    assert embedded_dir(cfg) != embedded_dir(DataConfig(embedded=EmbeddedConfig(**{**TINY.__dict__, "frames": 13})))


def test_frame_folders(tmp_path):
    paths = build_embedded(config(tmp_path, format="frames", train_per_class=1), progress=False, workers=1)
    assert "video_root" not in paths
    ann = load_annotations(paths["ann_file"], "val")[5]
    folder = os.path.join(paths["frame_root"], ann["frame_dir"])
    assert sorted(os.listdir(folder)) == [f"img_{i:05d}.jpg" for i in range(1, 13)]
    assert read_frame_folder(folder, [0, 11]).shape == (2, 32, 32, 3)


@pytest.mark.parametrize("format", ["video", "frames"])
def test_it_loads_through_the_real_input_path(tmp_path, format):
    cfg = config(tmp_path, format=format)
    ds = build_dataset(cfg, "train", train=True, progress=False)
    assert ds.class_names == list(CLASSES) and len(ds) == 2 * len(CLASSES)
    loader = build_loader(ds, batch_size=5, train=True, seed=0)
    loader.sampler.set_epoch(0)
    batch = next(iter(loader))
    imgs, heatmaps, labels = BatchTransform(cfg)(batch, torch.device("cpu"))
    assert imgs.shape == (5, 3, 4, 32, 32) and heatmaps.shape == (5, 17, 12, 56, 56) and labels.shape == (5,)
    assert torch.isfinite(imgs).all() and heatmaps.amax() > 0.5
    val = build_dataset(cfg, "val", train=False, progress=False, modalities=("pose",))
    assert len(val) == len(CLASSES)


@pytest.mark.parametrize("pair,colours", [(("drink", "phone_call"), ("red", "blue")),
                                          (("read", "hold_tablet"), ("yellow", "green"))])
def test_the_pose_stream_cannot_tell_the_rgb_pairs_apart(pair, colours):
    """With the same random draws, the two classes' keypoints are identical; only the held object's colour (which
    keypoints do not carry) differs between their frames."""
    hue = {"red": lambda f: (f[..., 0] > f[..., 1] + 60) & (f[..., 0] > f[..., 2] + 60),
           "blue": lambda f: (f[..., 2] > f[..., 0] + 60) & (f[..., 2] > f[..., 1] + 40),
           "yellow": lambda f: (f[..., 0] > f[..., 2] + 60) & (f[..., 1] > f[..., 2] + 60),
           "green": lambda f: (f[..., 1] > f[..., 0] + 60) & (f[..., 1] > f[..., 2] + 60)}
    for seed in range(3):
        a, b = (render_clip(np.random.RandomState(seed), CLASSES.index(name), 8, 48) for name in pair)
        np.testing.assert_array_equal(a["keypoint"], b["keypoint"])
        np.testing.assert_array_equal(a["keypoint_score"], b["keypoint_score"])
        frames_a, frames_b = a["frames"].astype(np.int64), b["frames"].astype(np.int64)
        differ = np.abs(frames_a - frames_b).max(-1) > 30
        assert differ.any(axis=(1, 2)).all(), "the object is in every frame"
        assert differ.mean() < 0.15, "and nothing else changes (the book covers up to ~12% of the close-up view)"
        for colour, own, other in ((colours[0], frames_a, frames_b), (colours[1], frames_b, frames_a)):
            extra = hue[colour](own).sum(axis=(1, 2)) - hue[colour](other).sum(axis=(1, 2))
            assert (extra >= 2).all(), f"every {pair[0]} / {pair[1]} frame shows its {colour} object"


def test_bad_settings(tmp_path):
    with pytest.raises(DataError, match="data.embedded.format"):
        build_embedded(config(tmp_path, format="gif"), progress=False)
    with pytest.raises(DataError, match="data.embedded.image_size"):
        build_embedded(config(tmp_path, image_size=33), progress=False)
    with pytest.raises(DataError, match="train_per_class"):
        build_embedded(config(tmp_path, train_per_class=0), progress=False)
    assert not os.path.exists(tmp_path) or os.listdir(tmp_path) == []
