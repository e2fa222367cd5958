"""Frame sampling: the draws of the authors' (mmaction2) and pyskl's UniformSampleFrames, spelled out here with a
fresh RandomState, and the sampler's guarantees for every video length."""
import numpy as np
import pytest

from epamx.data import rgb_frame_indices, uniform_sample_frames


def test_long_videos_take_one_random_frame_per_segment():
    rs = np.random.RandomState(255)
    bounds = np.array([i * 300 // 48 for i in range(49)])
    expected = bounds[:-1] + rs.randint(np.diff(bounds))
    np.testing.assert_array_equal(uniform_sample_frames(300), expected)


def test_medium_videos_skip_random_frames():
    rs = np.random.RandomState(255)
    skips = rs.choice(49, 70 - 48, replace=False)
    offset = np.zeros(49, dtype=np.int64)
    offset[skips] = 1
    np.testing.assert_array_equal(uniform_sample_frames(70), np.arange(48) + np.cumsum(offset)[:-1])


def test_short_videos_loop():
    np.testing.assert_array_equal(uniform_sample_frames(30), np.arange(48) % 30)
    np.testing.assert_array_equal(uniform_sample_frames(1), np.zeros(48))


def test_pyskl_variant_draws_the_interval_first():
    rs = np.random.RandomState(255)
    ratio = rs.rand() * 0 + 1
    num_frames = int(ratio * 300)
    offset = rs.randint(300 - num_frames + 1)
    bounds = np.array([i * num_frames // 48 for i in range(49)])
    expected = (bounds[:-1] + rs.randint(np.diff(bounds)) + offset) % 300
    got = uniform_sample_frames(300, p_interval=(1.0, 1.0))
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, uniform_sample_frames(300)), "the extra draw changes the test-mode frames"


@pytest.mark.parametrize("test_mode", [True, False])
@pytest.mark.parametrize("total", [1, 2, 17, 47, 48, 49, 60, 95, 96, 97, 150, 1000])
def test_guarantees(total, test_mode):
    inds = uniform_sample_frames(total, test_mode=test_mode, rng=total)
    assert inds.shape == (48,) and inds.dtype == np.int64
    assert inds.min() >= 0 and inds.max() < total
    if total >= 96:
        segment = np.arange(48) * total // 48
        assert ((inds >= segment) & (inds < np.append(segment[1:], total))).all()
    elif total >= 48:
        assert (np.diff(inds) >= 1).all() and (np.diff(inds) <= 2).all()
    else:
        assert (np.diff(inds) % total == 1 % total).all(), "consecutive frames, wrapped"


def test_test_mode_is_deterministic_and_leaves_numpy_alone():
    np.random.seed(0)
    before = np.random.rand()
    np.random.seed(0)
    a = uniform_sample_frames(500)
    assert np.random.rand() == before
    np.testing.assert_array_equal(a, uniform_sample_frames(500))


def test_train_mode_uses_the_given_generator():
    np.testing.assert_array_equal(uniform_sample_frames(500, test_mode=False, rng=3),
                                  uniform_sample_frames(500, test_mode=False, rng=np.random.RandomState(3)))
    draws = [tuple(uniform_sample_frames(500, test_mode=False, rng=seed)) for seed in range(5)]
    assert len(set(draws)) == 5
    np.random.seed(5)  # without a generator, NumPy's global one, as the original
    np.testing.assert_array_equal(uniform_sample_frames(500, test_mode=False),
                                  uniform_sample_frames(500, test_mode=False, rng=5))
    rs = np.random.RandomState(4)
    assert not np.array_equal(uniform_sample_frames(500, test_mode=False, rng=rs),
                              uniform_sample_frames(500, test_mode=False, rng=rs))


def test_several_clips():
    # Test mode, shorter than a clip: clip i starts at i * T // num_clips.
    inds = uniform_sample_frames(10, clip_len=16, num_clips=3)
    np.testing.assert_array_equal(inds, np.concatenate([np.arange(s, s + 16) for s in (0, 3, 6)]) % 10)
    assert uniform_sample_frames(100, clip_len=16, num_clips=3).shape == (48,)


def test_rgb_indices_are_every_third_pose_index():
    pose = uniform_sample_frames(300)
    rgb = rgb_frame_indices(pose)
    assert rgb.shape == (16,)
    np.testing.assert_array_equal(rgb, pose[[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, 45]])


def test_bad_arguments():
    with pytest.raises(ValueError, match="must be >= 1, got 0, 48, 1"):
        uniform_sample_frames(0)
    with pytest.raises(ValueError, match="samples one clip in train mode"):
        uniform_sample_frames(100, test_mode=False, num_clips=2)
