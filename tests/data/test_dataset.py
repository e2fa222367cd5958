"""ClipDataset, collate_clips and build_loader on tiny numbered videos (frame i of a video shows the number i):
which frames a clip holds, reproducibility, the corner cases of the authors' pipeline, and bad data."""
import os
import re
import shutil
import traceback

import numpy as np
import pytest
import torch

from epamx.data import (
    BatchTransform,
    ClipDataset,
    DataConfig,
    SampleError,
    build_dataset,
    build_loader,
    collate_clips,
    load_annotations,
    read_video,
    uniform_sample_frames,
    write_video,
)
from epamx.data.annotations import AnnotationError
from epamx.data.sampler import sample_seed
from epamx.data.transforms import crop_resize_frames
from epamx.errors import DataError, DataFileNotFound
from fakes import frame_numbers, make_annotation, write_numbered_dataset, write_pickle
from references import mmcompact_box, pil_crop_resize

LENGTHS = [30, 12, 45, 7, 20, 26]
CLIP_LEN = 12


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    root = tmp_path_factory.mktemp("numbered")
    paths = write_numbered_dataset(root, LENGTHS)
    return paths, load_annotations(paths["ann_file"], "all")


def dataset(numbered, train=False, **kwargs):
    paths, anns = numbered
    options = dict(video_root=paths["video_root"], clip_len=CLIP_LEN, rgb_every=3, frame_size=32, max_persons=2)
    options.update(kwargs)
    return ClipDataset(anns, ["a", "b", "c"], train, **options)


def pose_indices(sample, ann):
    """The pose frames a clip sampled, recovered from its keypoints (every frame's keypoints are different)."""
    kp = sample["keypoint"][0].numpy()
    return [int(np.flatnonzero((ann["keypoint"][0] == frame).all(axis=(1, 2)))[0]) for frame in kp]


def assert_same_sample(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_a_clip_holds_every_third_sampled_frame(numbered):
    ds = dataset(numbered)
    for index, ann in enumerate(numbered[1]):
        sample = ds[index]
        assert sample["imgs"].shape == (CLIP_LEN // 3, 32, 32, 3) and sample["imgs"].dtype == torch.uint8
        assert sample["keypoint"].shape == (2, CLIP_LEN, 17, 2) and sample["keypoint_score"].shape == (2, CLIP_LEN, 17)
        expected = uniform_sample_frames(ann["total_frames"], CLIP_LEN, test_mode=True)
        assert pose_indices(sample, ann) == list(expected)
        assert frame_numbers(sample["imgs"].numpy()) == list(expected[::3])
        np.testing.assert_array_equal(sample["keypoint_score"].numpy(), ann["keypoint_score"][:, expected])
        assert sample["label"] == ann["label"] and sample["index"] == index and sample["frame_dir"] == ann["frame_dir"]
        assert sample["img_shape"].tolist() == [32, 32] and sample["flip"] is False


def test_fewer_frames_than_a_clip_loop(numbered):
    ds = dataset(numbered)
    short = LENGTHS.index(7)
    assert frame_numbers(ds[short]["imgs"].numpy()) == [0, 3, 6, 2]
    for seed in range(3):
        sample = ds.__getitem__((short, seed))
        assert frame_numbers(sample["imgs"].numpy()) == [0, 3, 6, 2], "test mode ignores the seed"
    train = dataset(numbered, train=True)
    for seed in range(5):
        sample = train[(short, seed)]
        inds = pose_indices(sample, numbered[1][short])
        assert np.all(np.diff(inds) % 7 == 1)
        assert frame_numbers(sample["imgs"].numpy()) == inds[::3]


def test_test_mode_is_deterministic(numbered):
    ds = dataset(numbered)
    for index in range(len(ds)):
        assert_same_sample(ds[index], ds[(index, 12345)])


def test_train_mode_depends_only_on_seed_epoch_and_index(numbered):
    ds = dataset(numbered, train=True, flip_prob=0.5)
    index = LENGTHS.index(45)
    key = (index, sample_seed(7, 2, index))
    first = ds[key]
    for other in (3, 1, 0):
        ds[(other, sample_seed(7, 2, other))]  # what a worker read before does not matter
    assert_same_sample(first, ds[key])
    draws = {(tuple(pose_indices(ds[(index, sample_seed(7, epoch, index))], numbered[1][index])),
              ds[(index, sample_seed(7, epoch, index))]["flip"]) for epoch in range(6)}
    assert len(draws) == 6, "each epoch draws other frames"
    flips = [ds[(index, sample_seed(7, epoch, index))]["flip"] for epoch in range(20)]
    assert 3 < sum(flips) < 17


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_the_loader_gives_the_same_batches_with_any_number_of_workers(numbered):
    ds = dataset(numbered, train=True)
    runs = {}
    for workers in (0, 2):
        loader = build_loader(ds, batch_size=2, train=True, seed=11, workers=workers)
        runs[workers] = [_epoch(loader, epoch) for epoch in (0, 1)]
        del loader
    for epoch in (0, 1):
        assert len(runs[0][epoch]) == len(LENGTHS) // 2
        for a, b in zip(runs[0][epoch], runs[2][epoch]):
            assert_same_sample(a, b)
    order = [b["index"].tolist() for b in runs[0][0]], [b["index"].tolist() for b in runs[0][1]]
    assert order[0] != order[1], "each epoch its own order"


def test_pose_only_never_opens_a_video(numbered, tmp_path):
    paths, anns = numbered
    ds = ClipDataset(anns, ["a", "b", "c"], train=True, modalities=("pose",), video_root=str(tmp_path / "gone"),
                     clip_len=CLIP_LEN)
    for index in range(len(ds)):
        sample = ds[(index, index)]
        assert "imgs" not in sample and sample["keypoint"].shape == (2, CLIP_LEN, 17, 2)
    ds = ClipDataset(anns, ["a", "b", "c"], train=False, modalities=("pose",), clip_len=CLIP_LEN)
    batch = collate_clips([ds[0], ds[1]])
    assert "imgs" not in batch and batch["skipped"] == 0


def test_raw_videos_are_cropped_to_the_persons_over_the_whole_video(tmp_path):
    """Annotations in 64x64 pixels, the video in 32x32: the box is computed in the annotation's pixels (the
    authors' MMCompact over every frame) and scaled to the video's."""
    rng = np.random.RandomState(3)
    ann = make_annotation(rng, "raw", 1, persons=2, frames=15, img_shape=(64, 64))
    frames = np.random.RandomState(4).randint(0, 256, size=(15, 32, 32, 3)).astype(np.uint8)
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "raw.mp4", frames)
    path = write_pickle(tmp_path / "ann.pkl", [ann])
    anns = load_annotations(path)
    ds = ClipDataset(anns, ["a", "b"], train=False, video_root=str(tmp_path / "videos"), rgb_precropped=False,
                     clip_len=CLIP_LEN, rgb_every=3, frame_size=20)
    got = ds[0]["imgs"].numpy()
    box = mmcompact_box(anns[0]["keypoint"], (64, 64))
    assert box != (0, 0, 64, 64)
    inds = uniform_sample_frames(15, CLIP_LEN)[::3]
    decoded = read_video(tmp_path / "videos" / "raw.mp4", inds)
    expected = pil_crop_resize(decoded, tuple(int(v * 0.5) for v in box), 20)
    np.testing.assert_array_equal(got, expected)
    precropped = ClipDataset(anns, ["a", "b"], train=False, video_root=str(tmp_path / "videos"), clip_len=CLIP_LEN,
                             frame_size=20)
    np.testing.assert_array_equal(precropped[0]["imgs"].numpy(), crop_resize_frames(decoded, (0, 0, 32, 32), 20))


def test_persons_are_selected_and_absent_ones_draw_nothing(tmp_path):
    rng = np.random.RandomState(5)
    many = make_annotation(rng, "many", 0, persons=4, frames=20)
    many["keypoint_score"][1] *= 0.1
    many["keypoint_score"][2] *= 0.2
    nobody = make_annotation(rng, "nobody", 1, persons=0, frames=20)
    anns = load_annotations(write_pickle(tmp_path / "ann.pkl", [many, nobody]))
    ds = ClipDataset(anns, ["a", "b"], train=False, modalities=("pose",), clip_len=CLIP_LEN, max_persons=2)
    inds = uniform_sample_frames(20, CLIP_LEN)
    sample = ds[0]
    totals = anns[0]["keypoint_score"][:, inds].sum(axis=(1, 2))
    kept = sorted(np.argsort(-totals)[:2])
    assert kept == [0, 3]
    np.testing.assert_array_equal(sample["keypoint"].numpy(), anns[0]["keypoint"][kept][:, inds])
    empty = ds[1]
    assert empty["keypoint"].shape == (2, CLIP_LEN, 17, 2) and not empty["keypoint"].any()
    assert not empty["keypoint_score"].any()
    batch = collate_clips([sample, empty])
    _, heatmaps, _ = BatchTransform(DataConfig(), modalities=("pose",))(batch, torch.device("cpu"))
    assert heatmaps[0].amax() > 0.5 and not heatmaps[1].any()


def test_nan_keypoints_are_missing(tmp_path):
    ann = make_annotation(np.random.RandomState(6), "nan", 0, persons=1, frames=12)
    ann["keypoint"][0, :, 3] = np.nan
    anns = load_annotations(write_pickle(tmp_path / "ann.pkl", [ann]))
    sample = ClipDataset(anns, ["a"], train=False, modalities=("pose",), clip_len=CLIP_LEN)[0]
    assert torch.isfinite(sample["keypoint"]).all() and not sample["keypoint"][0, :, 3].any()


@pytest.fixture
def broken(tmp_path):
    """Six numbered videos; clip01's video missing, clip03's corrupt."""
    paths = write_numbered_dataset(tmp_path, [14, 16, 13, 15, 17, 12], seed=1)
    videos = tmp_path / "videos"
    os.remove(videos / "clip01.mp4")
    data = (videos / "clip03.mp4").read_bytes()
    (videos / "clip03.mp4").write_bytes(data[: len(data) // 3])
    return paths, load_annotations(paths["ann_file"], "all")


def test_bad_samples_are_errors_naming_the_sample_and_the_file(broken):
    paths, anns = broken
    ds = ClipDataset(anns, ["a", "b", "c"], train=False, video_root=paths["video_root"], clip_len=CLIP_LEN)
    for index in (1, 3):
        path = os.path.join(paths["video_root"], f"clip{index:02d}.mp4")
        with pytest.raises(SampleError, match=re.escape(f"sample {index} ('clip{index:02d}'): ") + ".*"
                           + re.escape(path)) as info:
            ds[index]
        assert isinstance(info.value.__cause__, DataError) and path in str(info.value.__cause__), "the cause is kept"
    loader = build_loader(ds, batch_size=2, train=False, workers=2)
    assert "sample 1 ('clip01')" in _loader_error(loader)
    del loader


def _loader_error(loader):
    """The SampleError's message, with the traceback's frames cleared: torch re-raises a worker's exception from a
    frame that holds it, a reference cycle through the loader's iterator; left to the garbage collector, which may
    finalise the iterator's queues before the iterator, its workers are not told to stop and time out (10 s)."""
    try:
        list(loader)
    except SampleError as e:
        traceback.clear_frames(e.__traceback__)
        return str(e)
    raise AssertionError("the loader raised no SampleError")


def test_unreadable_jpeg_names_the_sample_and_the_file(tmp_path):
    paths = write_numbered_dataset(tmp_path, [13, 14], frames=True)
    anns = load_annotations(paths["ann_file"], "all")
    bad = os.path.join(paths["frame_root"], "clip01", "img_00001.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8 not really")
    ds = ClipDataset(anns, ["a", "b", "c"], train=False, frame_root=paths["frame_root"], clip_len=CLIP_LEN)
    assert frame_numbers(ds[0]["imgs"].numpy()) == list(uniform_sample_frames(13, CLIP_LEN)[::3])
    with pytest.raises(SampleError, match=re.escape("sample 1 ('clip01'): " + bad)):
        ds[1]
    shutil.rmtree(os.path.join(paths["frame_root"], "clip00"))
    with pytest.raises(SampleError, match=re.escape("sample 0 ('clip00')") + ".*does not exist"):
        ds[0]


def test_skip_bad_drops_and_counts_them(broken):
    paths, anns = broken
    ds = ClipDataset(anns, ["a", "b", "c"], train=True, video_root=paths["video_root"], clip_len=CLIP_LEN,
                     skip_bad=True)
    assert ds[1] is None and ds[3] is None and ds[0] is not None
    batch = collate_clips([ds[0], ds[1], ds[2]])
    assert batch["skipped"] == 1 and batch["index"].tolist() == [0, 2] and batch["imgs"].shape[0] == 2
    assert collate_clips([ds[1], ds[3]]) is None, "a batch of nothing but bad samples"
    for workers in (0, 2):
        loader = build_loader(ds, batch_size=2, train=True, seed=1, workers=workers)
        for epoch in range(2):
            batches = _epoch(loader, epoch)
            seen = [i for b in batches if b is not None for i in b["index"].tolist()]
            skipped = sum(b["skipped"] if b is not None else 2 for b in batches)
            assert sorted(seen) == [0, 2, 4, 5] and skipped == 2
        del loader


def test_collate_refuses_mixed_clips(numbered):
    ds = dataset(numbered)
    a, b = ds[0], ds[1]
    b3 = dict(b, keypoint=torch.zeros(3, CLIP_LEN, 17, 2), keypoint_score=torch.zeros(3, CLIP_LEN, 17))
    with pytest.raises(SampleError, match="different person counts"):
        collate_clips([a, b3])
    with pytest.raises(SampleError, match="different \\(frames, joints, 2\\)"):
        collate_clips([a, dict(b, keypoint=torch.zeros(2, CLIP_LEN, 25, 2))])
    with pytest.raises(SampleError, match="different frame shapes"):
        collate_clips([a, dict(b, imgs=torch.zeros(4, 16, 16, 3, dtype=torch.uint8))])


def test_bad_settings(numbered):
    with pytest.raises(ValueError, match="modalities"):
        dataset(numbered, modalities=("depth",))
    with pytest.raises(ValueError, match="multiple of rgb_every"):
        dataset(numbered, clip_len=10)
    with pytest.raises(ValueError, match="needs video_root"):
        dataset(numbered, video_root="")
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(dataset(numbered), batch_size=0, train=False)


def test_build_dataset_from_a_posec3d_config(numbered, tmp_path):
    paths, anns = numbered
    labels = tmp_path / "labels.txt"
    labels.write_text("zero\none\ntwo\n")
    cfg = DataConfig(dataset="posec3d", ann_file=paths["ann_file"], video_root=paths["video_root"], clip_len=CLIP_LEN,
                     frame_size=32, label_map=str(labels))
    ds = build_dataset(cfg, "all", train=False)
    assert len(ds) == len(LENGTHS) and ds.class_names == ["zero", "one", "two"]
    assert frame_numbers(ds[0]["imgs"].numpy()) == list(uniform_sample_frames(30, CLIP_LEN)[::3])
    unnamed = build_dataset(DataConfig(dataset="posec3d", ann_file=paths["ann_file"], video_root=paths["video_root"]),
                            "all", train=True, num_classes=5)
    assert unnamed.class_names == [f"class_{i}" for i in range(5)]
    with pytest.raises(DataFileNotFound, match="data.ann_file"):
        build_dataset(DataConfig(dataset="posec3d", ann_file=str(tmp_path / "none.pkl")), "all", train=False)
    with pytest.raises(DataError, match="data.ann_file is empty"):
        build_dataset(DataConfig(dataset="posec3d"), "all", train=False)
    with pytest.raises(DataFileNotFound, match="data.video_root"):
        build_dataset(DataConfig(dataset="posec3d", ann_file=paths["ann_file"], video_root=str(tmp_path / "none")),
                      "all", train=False)
    with pytest.raises(DataError, match="'embedded' or 'posec3d'"):
        build_dataset(DataConfig(dataset="kinetics"), "all", train=False)
    with pytest.raises(DataError, match="the RGB stream needs data.video_root"):
        build_dataset(DataConfig(dataset="posec3d", ann_file=paths["ann_file"]), "all", train=False)
    empty = write_pickle(tmp_path / "empty_split.pkl", {"split": {"all": []}, "annotations": anns})
    with pytest.raises(DataError, match=re.escape(f"{empty}: split 'all' is empty")):
        build_dataset(DataConfig(dataset="posec3d", ann_file=str(empty)), "all", train=False, modalities=("pose",))
    with pytest.raises(DataFileNotFound, match=re.escape(str(tmp_path / "none.txt"))):
        build_dataset(DataConfig(dataset="posec3d", ann_file=paths["ann_file"], label_map=str(tmp_path / "none.txt")),
                      "all", train=False, modalities=("pose",))
        build_dataset(DataConfig(dataset="kinetics"), "all", train=False)
    assert len(build_dataset(DataConfig(dataset="posec3d", ann_file=paths["ann_file"]), "all", train=False,
                             modalities=("pose",))) == len(LENGTHS)


def _pose_file(tmp_path, labels, joints=17, name="ann.pkl", **top):
    rng = np.random.RandomState(9)
    anns = [make_annotation(rng, f"clip{i:02d}", label, persons=1, frames=CLIP_LEN, joints=joints)
            for i, label in enumerate(labels)]
    return str(write_pickle(tmp_path / name, {"split": {"all": [a["frame_dir"] for a in anns]}, "annotations": anns,
                                               **top}))


def _pose_dataset(ann_file, skeleton="coco17", num_classes=None, **cfg):
    cfg = DataConfig(dataset="posec3d", ann_file=ann_file, clip_len=CLIP_LEN, skeleton=skeleton, **cfg)
    return build_dataset(cfg, "all", train=True, modalities=("pose",), num_classes=num_classes, progress=False)


def test_a_label_far_beyond_the_others_is_refused(tmp_path):
    path = _pose_file(tmp_path, [0, 1, 10 ** 9, 2])
    with pytest.raises(AnnotationError) as info:
        _pose_dataset(path)
    message = str(info.value)
    for part in (path, "'clip02' has label 1000000000", "model.num_classes", "data.label_map"):
        assert part in message
    # the class count or the names given: the label is taken as it is (or checked against them)
    with pytest.raises(AnnotationError, match=re.escape(f"{path}: annotation 'clip02' has label 1000000000, but the "
                                                        "model has 5 classes")):
        _pose_dataset(path, num_classes=5)
    assert _pose_dataset(_pose_file(tmp_path, [0, 1, 100, 2], name="100.pkl"), num_classes=101).num_classes == 101


def test_the_far_label_rule_passes_real_datasets(tmp_path):
    # every class present, a few absent, half absent, 64 absent from a small dataset: all pass; 65 absent do not
    for labels, classes in (([0, 1, 2], 3), ([0, 1, 4, 5, 9], 10), (list(range(0, 120, 2)), 119),
                            ([0, 1, 2, 67], 68)):
        assert _pose_dataset(_pose_file(tmp_path, labels, name=f"ok{classes}.pkl")).num_classes == classes
    with pytest.raises(AnnotationError, match="'clip03' has label 68, far beyond the others: the 4 distinct labels "
                                              "would make 69 classes, 65 of them without a clip"):
        _pose_dataset(_pose_file(tmp_path, [0, 1, 2, 68], name="far.pkl"))


def test_labels_must_have_a_name(tmp_path):
    path = _pose_file(tmp_path, [0, 1, 2], name="named.pkl", classes=["a", "b"])
    with pytest.raises(AnnotationError, match=re.escape(f"{path}: annotation 'clip02' has label 2, but the file's "
                                                        "'classes' list names 2 classes (labels 0..1)")):
        _pose_dataset(path)
    labels = tmp_path / "labels.txt"
    labels.write_text("zero\none\n")
    plain = _pose_file(tmp_path, [0, 1, 2])
    with pytest.raises(AnnotationError, match=re.escape(f"{plain}: annotation 'clip02' has label 2, but "
                                                        f"data.label_map {labels} names 2 classes")):
        _pose_dataset(plain, label_map=str(labels), num_classes=5)
    labels.write_text("zero\none\ntwo\n")
    assert _pose_dataset(plain, label_map=str(labels), num_classes=5).class_names == ["zero", "one", "two", "class_3",
                                                                                      "class_4"]


def test_the_skeleton_is_checked_when_loading(tmp_path):
    five = _pose_file(tmp_path, [0, 1, 2], joints=5, name="five.pkl")
    with pytest.raises(AnnotationError, match=re.escape(f"{five}: annotation 0 ('clip00'): 'keypoint' has 5 joints "
                                                        "per person, but the skeleton has 17")):
        _pose_dataset(five)
    with pytest.raises(AnnotationError, match="has 5 joints per person, but the skeleton has 25"):
        _pose_dataset(five, skeleton="ntu25")
    assert len(_pose_dataset(five, skeleton="any", flip_prob=0.0)) == 3
    with pytest.raises(DataError, match="data.skeleton must be one of"):
        _pose_dataset(five, skeleton="h36m")
