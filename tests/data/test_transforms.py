"""The worker-side transforms: the persons' box against a NumPy port of the authors' MMCompact (and against the
device-side PoseHeatmaps box), person selection, and the frame crop against PIL."""
import numpy as np
import pytest
import torch

from epamx.data.transforms import compact_box, crop_resize_frames, select_persons
from epamx.nn import PoseHeatmaps
from references import mmcompact_box, pil_crop_resize


def random_clip(rng, quantised=False):
    """(M, T, V, 2) float32 keypoints in an odd-sized image: persons anywhere, sometimes partly outside, tiny or
    absent; zeros and NaN for missing joints. ``quantised``: coordinates on a grid of sevenths, where float32 and
    float64 arithmetic round differently more often."""
    h, w = int(rng.randint(17, 1500)), int(rng.randint(17, 2000))
    m, t, v = int(rng.randint(0, 4)), int(rng.randint(1, 6)), int(rng.choice([5, 17]))
    scale = rng.choice([0.005, 0.05, 0.3, 1.2])
    centre = rng.uniform(-0.1, 1.1, size=2) * (w, h)
    kp = centre + (rng.rand(m, t, v, 2) - 0.5) * scale * (w, h)
    if quantised:
        kp = np.round(kp * 7) / 7
    kp = kp.astype(np.float32)
    kp[rng.rand(*kp.shape) < 0.1] = 0
    kp[rng.rand(*kp.shape) < 0.03] = np.nan
    return kp, (h, w)


@pytest.mark.parametrize("quantised", [False, True])
def test_compact_box_matches_the_authors_mmcompact(quantised):
    rng = np.random.RandomState(int(quantised))
    cases = 0
    for _ in range(1500):
        kp, shape = random_clip(rng, quantised)
        expected = mmcompact_box(kp, shape)
        assert compact_box(kp, shape) == expected, (kp.tolist(), shape)
        cases += expected != (0, 0, shape[1], shape[0])
    assert cases > 500, "most clips are cropped"


def test_compact_box_rules():
    # x in [100, 300], y in [200, 300]: centre (200, 250), half sizes 125 x 62.5 -> squared to 125 x 125.
    kp = np.array([[[[100, 200], [300, 300], [0, 0], [np.nan, 250]]]], np.float32)
    assert compact_box(kp, (1080, 1920)) == (75, 125, 325, 375)
    assert compact_box(kp, (300, 310)) == (75, 125, 310, 300), "clipped to the image"
    assert compact_box(kp, (1080, 1920), padding=0) == (100, 150, 300, 350)
    tiny = np.array([[[[100, 200], [109, 260]]]], np.float32)
    assert compact_box(tiny, (480, 640)) == (0, 0, 640, 480), "narrower than 10 pixels: the whole image"
    assert compact_box(np.zeros((2, 3, 17, 2), np.float32), (48, 64)) == (0, 0, 64, 48)
    assert compact_box(np.zeros((0, 3, 17, 2), np.float32), (48, 64)) == (0, 0, 64, 48)
    assert compact_box(np.full((1, 2, 3, 2), np.nan, np.float32), (48, 64)) == (0, 0, 64, 48)
    # Fractional corners are truncated: centre (25.6, 26.9), half width 15.3 / 2 * 1.25, the square's half side.
    kp = np.array([[[[10.3, 20.7], [40.9, 33.1]]]], np.float32)
    assert compact_box(kp, (100, 100)) == mmcompact_box(kp, (100, 100)) == (6, 7, 44, 46)


def test_compact_box_matches_pose_heatmaps_boxes():
    rng = np.random.RandomState(2)
    n, m, t, v = 400, 2, 3, 17
    shapes = np.stack([rng.randint(17, 1500, size=n), rng.randint(17, 2000, size=n)], 1)
    kp = np.empty((n, m, t, v, 2), np.float32)
    for i in range(n):
        h, w = shapes[i]
        centre = rng.uniform(-0.1, 1.1, size=2) * (w, h)
        clip = centre + (rng.rand(m, t, v, 2) - 0.5) * rng.choice([0.005, 0.3, 1.2]) * (w, h)
        kp[i] = np.round(clip * 7) / 7 if i % 2 else clip
    kp[rng.rand(*kp.shape) < 0.1] = 0
    kp[rng.rand(*kp.shape) < 0.02] = np.nan
    kp[rng.rand(*kp.shape) < 0.01] = np.inf
    kp[7] = 0
    module = PoseHeatmaps(allow_imgpad=False)
    x, y = torch.from_numpy(kp).unbind(-1)
    img_h, img_w = torch.from_numpy(shapes).double().unbind(-1)
    boxes = module._boxes(x, y, torch.isfinite(x) & (x != 0), torch.isfinite(y) & (y != 0), img_h, img_w)
    boxes = torch.stack(boxes, 1).numpy()
    np.testing.assert_array_equal(boxes, np.trunc(boxes))
    for i in range(n):
        assert compact_box(kp[i], tuple(shapes[i])) == tuple(int(b) for b in boxes[i]), i


def test_select_persons_keeps_the_highest_scores_in_file_order():
    rng = np.random.RandomState(3)
    kp = rng.rand(5, 4, 17, 2).astype(np.float32) * 100
    score = rng.rand(5, 4, 17).astype(np.float32)
    totals = score.sum((1, 2))
    got_kp, got_score = select_persons(kp, score, 3)
    best = sorted(np.argsort(-totals)[:3])
    np.testing.assert_array_equal(got_kp, kp[best])
    np.testing.assert_array_equal(got_score, score[best])
    same = np.repeat(score[:1], 5, axis=0)  # ties: the first persons of the file
    np.testing.assert_array_equal(select_persons(kp, same, 2)[0], kp[:2])
    with_nan = score.copy()
    with_nan[int(np.argmax(totals)), 0, 0] = np.nan  # NaN counts as 0, not as a person to drop or keep first
    nan_totals = np.nan_to_num(with_nan).sum((1, 2))
    np.testing.assert_array_equal(select_persons(kp, with_nan, 2)[0], kp[sorted(np.argsort(-nan_totals)[:2])])
    kept_kp, kept_score = select_persons(kp, score, 5)
    np.testing.assert_array_equal(kept_kp, kp)
    np.testing.assert_array_equal(kept_score, score)


@pytest.mark.parametrize("persons", [0, 1, 2])
def test_select_persons_pads_with_absent_persons(persons):
    rng = np.random.RandomState(persons)
    kp = rng.rand(persons, 6, 17, 2).astype(np.float32) + 1
    score = rng.rand(persons, 6, 17).astype(np.float32) + 0.5
    got_kp, got_score = select_persons(kp, score, 3)
    assert got_kp.shape == (3, 6, 17, 2) and got_score.shape == (3, 6, 17)
    assert got_kp.dtype == np.float32 and got_score.dtype == np.float32
    np.testing.assert_array_equal(got_kp[:persons], kp)
    np.testing.assert_array_equal(got_score[:persons], score)
    assert not got_kp[persons:].any() and not got_score[persons:].any()


@pytest.mark.parametrize("box,size", [((3, 5, 30, 26), 20), ((-7, 2, 19, 40), 32), ((10, 10, 10, 20), 16),
                                      ((0, 0, 37, 29), 29), ((30, 20, 200, 90), 45)])
def test_crop_resize_frames_matches_pil(box, size):
    frames = np.random.RandomState(size).randint(0, 256, size=(3, 29, 37, 3)).astype(np.uint8)
    got = crop_resize_frames(frames, box, size)
    assert got.shape == (3, size, size, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, pil_crop_resize(frames, box, size))


def test_crop_resize_frames_keeps_frames_that_already_fit():
    frames = np.random.RandomState(0).randint(0, 256, size=(2, 24, 24, 3)).astype(np.uint8)
    assert crop_resize_frames(frames, (0, 0, 24, 24), 24) is frames
    assert crop_resize_frames(frames, (-5, -5, 99, 99), 24) is frames
