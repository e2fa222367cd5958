"""The device side of the pipeline (BatchTransform): keypoints through crop -> rescale -> flip against a NumPy
port of the authors' MMCompact -> Resize((56, 56)) -> Flip, heatmaps against the NumPy GeneratePoseTarget, and
frames flipped and normalised."""
import numpy as np
import pytest
import torch

from epamx.data import BatchTransform, DataConfig
from epamx.errors import DataError
from epamx.ops import COCO17_FLIP_PAIRS, render_heatmaps_reference
from references import mmcompact_box

LEFT_WRIST, RIGHT_WRIST = 9, 10


def authors_pose_pipeline(kp, score, img_shape, flip, size=56):
    """One clip as the authors' pipeline transforms it, in NumPy: MMCompact (NaN -> 0, the box, missing zeros not
    shifted), Resize(scale=(size, size), keep_ratio=False) (keypoints times a float32 scale), Flip (x -> W - x for
    non-zero x, COCO-17 left and right swapped)."""
    kp = np.array(kp, dtype=np.float32)
    score = np.array(score, dtype=np.float32)
    kp[np.isnan(kp)] = 0
    x0, y0, x1, y1 = mmcompact_box(kp, img_shape)
    kp_x, kp_y = kp[..., 0], kp[..., 1]
    kp_x[kp_x != 0] -= x0
    kp_y[kp_y != 0] -= y0
    h, w = y1 - y0, x1 - x0
    kp = kp * np.array([size / w, size / h], dtype=np.float32)
    if flip:
        kp_x = kp[..., 0]
        kp_x[kp_x != 0] = size - kp_x[kp_x != 0]
        order = list(range(kp.shape[2]))
        for left, right in COCO17_FLIP_PAIRS:
            order[left], order[right] = right, left
        kp, score = kp[:, :, order], score[:, :, order]
    return kp, score


def make_batch(n=6, m=2, t=7, seed=0, frames=(5, 18, 22)):
    """A collated batch as ClipDataset/collate_clips produce it: NaN already 0, padded persons absent; clip 1 holds
    a pose too small to crop, clip 2 no person at all, clip 3 a person partly outside the image; every third clip
    is not flipped. frames: (T, H, W) of the uint8 RGB frames."""
    rng = np.random.RandomState(seed)
    shapes = np.stack([rng.randint(40, 1100, size=n), rng.randint(40, 1900, size=n)], 1)
    kp = np.zeros((n, m, t, 17, 2), np.float32)
    for i, (h, w) in enumerate(shapes):
        centre = rng.uniform(0.2, 0.8, size=2) * (w, h)
        extent = rng.uniform(0.1, 0.6, size=2) * (w, h)
        kp[i] = centre + (rng.rand(m, t, 17, 2) - 0.5) * extent
    kp[1] = kp[1, 0, 0, 0] + rng.rand(m, t, 17, 2) * 5
    kp[2:3] = 0
    kp[3:4, 0, :, :5, 0] = -20.0
    kp[rng.rand(*kp.shape) < 0.05] = 0
    score = rng.uniform(0.05, 1, size=(n, m, t, 17)).astype(np.float32)
    score[kp[..., 0] == 0] = 0
    flip = np.arange(n) % 3 != 2
    imgs = rng.randint(0, 256, size=(n,) + tuple(frames) + (3,)).astype(np.uint8)
    return {"keypoint": torch.from_numpy(kp), "keypoint_score": torch.from_numpy(score),
            "img_shape": torch.from_numpy(shapes.astype(np.int64)), "flip": torch.from_numpy(flip),
            "label": torch.arange(n), "imgs": torch.from_numpy(imgs)}


def test_keypoints_match_the_authors_pipeline():
    batch = make_batch()
    transform = BatchTransform(DataConfig())
    got, got_score = transform.heatmaps.to_heatmap_coordinates(batch["keypoint"], batch["keypoint_score"],
                                                                 batch["img_shape"], batch["flip"])
    for i in range(len(got)):
        expected, expected_score = authors_pose_pipeline(batch["keypoint"][i].numpy(),
                                                         batch["keypoint_score"][i].numpy(),
                                                         tuple(batch["img_shape"][i].tolist()), bool(batch["flip"][i]))
        if batch["flip"][i]:
            # epamx mirrors pixel centres, x -> (W - 1) - x, as flipping the frames does; the authors' keypoint Flip
            # uses W - x, one heatmap pixel further right (PoseHeatmaps' documented choice).
            expected[..., 0] = np.where(expected[..., 0] != 0, expected[..., 0] - 1, 0)
        np.testing.assert_allclose(got[i].numpy(), expected, rtol=0, atol=2e-5)
        np.testing.assert_array_equal(got_score[i].numpy(), expected_score)


def test_heatmaps_are_the_numpy_renderers_of_those_keypoints():
    batch = make_batch(n=4, t=5, seed=1)
    transform = BatchTransform(DataConfig(), modalities=("pose",))
    imgs, heatmaps, labels = transform(batch, torch.device("cpu"))
    assert imgs is None and heatmaps.shape == (4, 17, 5, 56, 56) and heatmaps.dtype == torch.float32
    torch.testing.assert_close(labels, batch["label"])
    coords, scores = [], []
    for i in range(4):
        kp, score = authors_pose_pipeline(batch["keypoint"][i].numpy(), batch["keypoint_score"][i].numpy(),
                                          tuple(batch["img_shape"][i].tolist()), bool(batch["flip"][i]))
        if batch["flip"][i]:
            kp[..., 0] = np.where(kp[..., 0] != 0, kp[..., 0] - 1, 0)
        coords.append(kp)
        scores.append(score)
    expected = render_heatmaps_reference(torch.from_numpy(np.stack(coords)), torch.from_numpy(np.stack(scores)),
                                         56, sigma=0.6, eps=1e-4)
    torch.testing.assert_close(heatmaps, expected, rtol=0, atol=1e-6)
    assert heatmaps[0].amax() > 0.5 and heatmaps[2].abs().sum() == 0, "no person, no heatmap"


def test_a_flip_keeps_joint_identities():
    """After a flip, the joint labelled left wrist is where the mirrored right wrist is, and vice versa."""
    rng = np.random.RandomState(4)
    kp = np.zeros((1, 1, 1, 17, 2), np.float32)
    kp[..., 0] = rng.uniform(300, 700, size=17)
    kp[..., 1] = rng.uniform(100, 500, size=17)
    kp[..., LEFT_WRIST, :] = (650, 300)   # the person's left wrist on the image's right
    kp[..., RIGHT_WRIST, :] = (320, 420)
    score = np.ones((1, 1, 1, 17), np.float32)
    transform = BatchTransform(DataConfig(), modalities=("pose",))
    plain = dict(keypoint=torch.from_numpy(kp), keypoint_score=torch.from_numpy(score),
                 img_shape=torch.tensor([[720, 1280]]), label=torch.tensor([0]))
    out = {}
    for flip in (False, True):
        batch = {**plain, "flip": torch.tensor([flip])}
        coords, _ = transform.heatmaps.to_heatmap_coordinates(batch["keypoint"], batch["keypoint_score"],
                                                              batch["img_shape"], batch["flip"])
        out[flip] = (coords[0, 0, 0].numpy(), transform(batch, torch.device("cpu"))[1][0, :, 0].numpy())
    (coords, maps), (flipped, flipped_maps) = out[False], out[True]
    assert coords[LEFT_WRIST, 0] > 28 > coords[RIGHT_WRIST, 0]
    assert flipped[LEFT_WRIST, 0] > 28 > flipped[RIGHT_WRIST, 0], "the wrist on the right is the left one again"
    np.testing.assert_allclose(flipped[LEFT_WRIST], (55 - coords[RIGHT_WRIST, 0], coords[RIGHT_WRIST, 1]), atol=1e-5)
    np.testing.assert_allclose(flipped[RIGHT_WRIST], (55 - coords[LEFT_WRIST, 0], coords[LEFT_WRIST, 1]), atol=1e-5)
    for joint, mirror in ((LEFT_WRIST, RIGHT_WRIST), (RIGHT_WRIST, LEFT_WRIST)):
        peak = np.unravel_index(flipped_maps[joint].argmax(), (56, 56))
        mirrored_peak = np.unravel_index(maps[mirror][:, ::-1].argmax(), (56, 56))
        assert peak == mirrored_peak


@pytest.mark.parametrize("channels_last", [False, True])
def test_frames_are_flipped_and_normalised(channels_last):
    batch = make_batch(n=3, seed=2, frames=(4, 13, 18))
    transform = BatchTransform(DataConfig(), modalities=("rgb",))
    imgs, heatmaps, _ = transform(batch, torch.device("cpu"), channels_last=channels_last)
    assert heatmaps is None and imgs.shape == (3, 3, 4, 13, 18) and imgs.dtype == torch.float32
    if channels_last:
        assert imgs.is_contiguous(memory_format=torch.channels_last_3d)
    frames = batch["imgs"].numpy().astype(np.float32)
    mean = np.array([123.675, 116.28, 103.53], np.float32)
    std = np.array([58.395, 57.12, 57.375], np.float32)
    for i in range(3):
        clip = frames[i][:, :, ::-1] if batch["flip"][i] else frames[i]
        expected = ((clip - mean) / std).transpose(3, 0, 1, 2)
        np.testing.assert_allclose(imgs[i].numpy(), expected, rtol=1e-6, atol=1e-6)


def test_the_skeleton_must_match():
    batch = make_batch(n=2)
    batch["keypoint"] = torch.zeros(2, 2, 7, 25, 2)
    batch["keypoint_score"] = torch.zeros(2, 2, 7, 25)
    batch["frame_dir"] = ["first", "second"]
    with pytest.raises(DataError, match=r"25 joints but data.skeleton is 17-joint \(clips \['first', 'second'\]\)"):
        BatchTransform(DataConfig())(batch, torch.device("cpu"))
    with pytest.raises(DataError, match="data.skeleton must be one of"):
        BatchTransform(DataConfig(skeleton="h36m"))
    _, heatmaps, _ = BatchTransform(DataConfig(skeleton="ntu25"), modalities=("pose",))(batch, torch.device("cpu"))
    assert heatmaps.shape == (2, 25, 7, 56, 56)


def test_any_skeleton_renders_its_joints_and_flips_without_swapping():
    """skeleton = "any": a 5-joint layout renders 5 channels; a flip mirrors each joint's heatmap in place (no
    left/right swap), i.e. equals rendering the mirrored coordinates of the same joints."""
    rng = np.random.RandomState(3)
    kp = torch.from_numpy(rng.uniform(8, 56, size=(2, 1, 4, 5, 2)).astype(np.float32))
    batch = {"keypoint": kp, "keypoint_score": torch.ones(2, 1, 4, 5), "img_shape": torch.tensor([[64, 64]] * 2),
             "flip": torch.tensor([False, True]), "label": torch.tensor([0, 1])}
    cfg = DataConfig(skeleton="any", heatmap_size=16)
    _, heatmaps, _ = BatchTransform(cfg, ("pose",))(batch, torch.device("cpu"))
    assert heatmaps.shape == (2, 5, 4, 16, 16)
    unflipped = BatchTransform(cfg, ("pose",))({**batch, "flip": torch.tensor([False, False])}, torch.device("cpu"))[1]
    coords, _ = BatchTransform(cfg, ("pose",)).heatmaps.to_heatmap_coordinates(kp, None, (64, 64), None)
    mirrored = coords.clone()
    mirrored[..., 0] = 15 - mirrored[..., 0]
    expected = render_heatmaps_reference(mirrored[1:], torch.ones(1, 1, 4, 5), (16, 16), 0.6)
    torch.testing.assert_close(heatmaps[1:], expected.to(heatmaps.dtype), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(heatmaps[:1], unflipped[:1])
    with pytest.raises(ValueError, match="skeleton"):
        BatchTransform(DataConfig(skeleton="coco17"), ("pose",))(batch, torch.device("cpu"))
