"""The input pipelines a stage reads its clips through (epamx.data.pipelines): the pose-only pipeline's keypoint
geometry against the authors' chain (pyskl's PoseCompact -> Resize -> RandomResizedCrop -> Resize, written out in
references.py) and against the device-side crop, the RGB-only pipeline's own frame sampling, the keypoint flip
rules, and bad settings."""
import numpy as np
import pytest
import torch

from epamx.data import BatchTransform, ClipDataset, DataConfig, get_pipeline, load_annotations, uniform_sample_frames
from epamx.data.transforms import posec3d_keypoints, random_resized_crop
from epamx.nn import PoseHeatmaps
from fakes import frame_numbers, make_annotation, write_numbered_dataset
from references import pyskl_pose_only_keypoints

SIZE = 56


def random_keypoints(seed, persons=2, frames=9, img_shape=(480, 640)):
    """Persons anywhere (partly off the image), some joints missing (0) or NaN."""
    rng = np.random.RandomState(seed)
    ann = make_annotation(rng, "x", 0, persons, frames, img_shape, missing=0.1)
    kp = ann["keypoint"]
    kp[..., 0] += rng.uniform(-0.3, 0.3) * img_shape[1] * (kp[..., 0] != 0)
    kp[rng.rand(*kp.shape[:3]) < 0.02] = np.nan
    return kp


def present(kp):
    original = np.isfinite(kp).all(-1) & (np.nan_to_num(kp) != 0).all(-1)
    return original


@pytest.mark.parametrize("img_shape", [(480, 640), (1080, 1920), (57, 41)])
@pytest.mark.parametrize("seed", range(6))
def test_pose_only_training_geometry_is_the_authors(seed, img_shape):
    kp = random_keypoints(seed, img_shape=img_shape) * (np.array(img_shape[::-1]) / np.array([640, 480]))
    kp = kp.astype(np.float32)
    ours = posec3d_keypoints(kp, img_shape, SIZE, np.random.RandomState(100 + seed))
    ref = pyskl_pose_only_keypoints(kp, img_shape, SIZE, np.random.RandomState(100 + seed))
    keep = present(kp)
    assert ours.dtype == np.float32 and ours.shape == kp.shape
    np.testing.assert_allclose(ours[keep], ref[keep], rtol=0, atol=2e-4)
    assert (ours[~keep] == 0).all()  # missing stays missing


@pytest.mark.parametrize("seed", range(4))
def test_pose_only_test_geometry_is_the_authors_and_the_device_crop_with_padding(seed):
    kp = random_keypoints(seed)
    ours = posec3d_keypoints(kp, (480, 640), SIZE)
    ref = pyskl_pose_only_keypoints(kp, (480, 640), SIZE)
    keep = present(kp)
    np.testing.assert_allclose(ours[keep], ref[keep], rtol=0, atol=2e-4)
    # the device-side PoseCompact (epamx.nn.PoseHeatmaps with allow_imgpad=True) is an independent implementation
    device, _ = PoseHeatmaps(SIZE, allow_imgpad=True).to_heatmap_coordinates(
        torch.from_numpy(np.nan_to_num(kp))[None], None, (480, 640))
    np.testing.assert_allclose(ours[keep], device[0].numpy()[keep], rtol=0, atol=2e-4)


def test_random_resized_crop_draws_within_its_ranges():
    rng = np.random.RandomState(0)
    fractions, aspects = [], []
    for _ in range(2000):
        h = rng.randint(40, 90)  # near-square, as the persons' box is (a far-from-square image may fall back to
        w = h + rng.randint(-2, 3)  # its centred square, below the area range)
        x0, y0, x1, y1 = random_resized_crop(rng, (h, w))
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        fractions.append((x1 - x0) * (y1 - y0) / (h * w))
        aspects.append((x1 - x0) / (y1 - y0))
    fractions, aspects = np.array(fractions), np.array(aspects)
    assert fractions.min() > 0.45 and fractions.max() <= 1.0 and 0.7 < fractions.mean() < 0.9
    assert aspects.min() > 0.6 and aspects.max() < 1.6


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    paths = write_numbered_dataset(root, [30, 12, 100, 7, 50], img_shape=(32, 32))
    return paths, load_annotations(paths["ann_file"], "all")


def dataset(numbered, pipeline, train=False, modalities=("rgb", "pose"), **kwargs):
    paths, anns = numbered
    return ClipDataset(anns, ["a", "b", "c"], train, modalities, video_root=paths["video_root"], clip_len=12,
                       rgb_every=3, frame_size=32, max_persons=2, pipeline=pipeline, heatmap_size=8, **kwargs)


def test_the_rgb_only_pipeline_samples_its_frames_on_their_own(numbered):
    rgb_only, multimodal = dataset(numbered, "rgb_only", modalities=("rgb",)), dataset(numbered, "multimodal")
    for index, ann in enumerate(numbered[1]):
        own = uniform_sample_frames(ann["total_frames"], 4, test_mode=True)  # clip_len // rgb_every frames
        assert frame_numbers(rgb_only[index]["imgs"].numpy()) == list(own)
        every_third = uniform_sample_frames(ann["total_frames"], 12, test_mode=True)[::3]
        assert frame_numbers(multimodal[index]["imgs"].numpy()) == list(every_third)
    # training: random frames, a function of the sample's seed
    train = dataset(numbered, "rgb_only", train=True, modalities=("rgb",))
    assert torch.equal(train[(2, 5)]["imgs"], train[(2, 5)]["imgs"])
    assert len({tuple(frame_numbers(train[(2, s)]["imgs"].numpy())) for s in range(8)}) > 1


def test_pose_only_clips_come_cropped_and_render_as_the_device_crop_with_padding(numbered):
    cfg = DataConfig(heatmap_size=8, clip_len=12)
    ds = dataset(numbered, "pose_only", modalities=("pose",))
    plain = dataset(numbered, "multimodal", modalities=("pose",))
    for index in range(len(ds)):
        sample = ds[index]
        assert sample["img_shape"].tolist() == [8, 8] and "imgs" not in sample
        batch = {k: (v[None] if isinstance(v, torch.Tensor) else torch.tensor([v])) for k, v in sample.items()
                 if k not in ("frame_dir",)}
        _, heatmaps, _ = BatchTransform(cfg, ("pose",), "pose_only")(batch, torch.device("cpu"))
        raw = plain[index]
        expected = PoseHeatmaps(8, allow_imgpad=True, eps=cfg.eps)(raw["keypoint"][None], raw["keypoint_score"][None],
                                                                   raw["img_shape"][None])
        torch.testing.assert_close(heatmaps, expected, rtol=0, atol=1e-5)
    train = dataset(numbered, "pose_only", train=True, modalities=("pose",))
    crops = {train[(2, s)]["keypoint"].numpy().tobytes() for s in range(6)}
    assert len(crops) == 6  # a random crop per draw
    assert torch.equal(train[(2, 3)]["keypoint"], train[(2, 3)]["keypoint"])


@pytest.mark.parametrize("rule, width", [("mirror", 7), ("authors", 8)])
def test_the_keypoint_flip_rules(rule, width):
    kp = torch.tensor([[[[[2.5, 3.0], [6.0, 1.0]]]]])  # (N=1, M=1, T=1, V=2, 2) on an 8x8 grid, no crop
    flipped, _ = PoseHeatmaps(8, crop=False, flip_pairs=[(0, 1)], flip_rule=rule).to_heatmap_coordinates(
        kp, None, (8, 8), flip=True)
    assert flipped[0, 0, 0].tolist() == [[width - 6.0, 1.0], [width - 2.5, 3.0]]  # mirrored, left and right swapped
    cfg = DataConfig(heatmap_size=8, keypoint_flip=rule)
    assert BatchTransform(cfg, ("pose",)).heatmaps.flip_rule == rule


def test_bad_pipelines(numbered):
    with pytest.raises(ValueError, match="no input pipeline 'pose'; the pipelines are multimodal, pose_only, rgb_only"):
        get_pipeline("pose")
    with pytest.raises(ValueError, match="pipeline 'pose_only' feeds only the pose stream, not rgb"):
        dataset(numbered, "pose_only")
    with pytest.raises(ValueError, match="pipeline 'rgb_only' feeds only the rgb stream, not pose"):
        dataset(numbered, "rgb_only", modalities=("pose",))
    with pytest.raises(ValueError, match="flip_rule must be one of mirror, authors"):
        PoseHeatmaps(8, flip_rule="left")
