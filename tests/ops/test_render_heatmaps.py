"""render_heatmaps against a NumPy reference of PoseC3D's GeneratePoseTarget written here from its specification
(epamx.ops.render_heatmaps' docstring): every pixel of every channel evaluated at once, windows as masks, rather
than the original's loop over windows (which epamx's own render_heatmaps_reference follows)."""
import math

import numpy as np
import pytest
import torch

from epamx import _C
from epamx.ops import COCO17_LIMBS, NTU25_BONES, render_heatmaps, render_heatmaps_reference
from testkit import DEVICES, on_busy_side_stream, poisoned_allocations

# fp32 against the reference, as the issue asks. Measured on the CPU: 1.2e-7 (the polynomial exp); the GPU may
# fuse multiply-adds, which moves float32 segment distances by a few ulps.
ATOL = 1e-5


def dense_reference(keypoints, scores, size, sigma, limbs=(), with_joints=True, eps=1e-4):
    """(N, M, T, V, 2), (N, M, T, V) -> (N, C, T, H, W) float32, every pixel of every stamp evaluated. eps defaults
    to mmaction2's GeneratePoseTarget's; NaN and infinite scores are missing, like NaN and infinite coordinates."""
    kp = keypoints.detach().cpu().float().numpy()
    sc = (torch.ones(kp.shape[:-1]) if scores is None else scores.detach().cpu().float()).numpy()
    h, w = size
    xs = np.arange(w, dtype=np.float32)
    ys = np.arange(h, dtype=np.float32)[:, None]
    s2 = np.float32(sigma * sigma)

    def axis_mask(lo, hi, n):
        # float64 bounds with truncation toward zero; NaN and infinite coordinates give empty windows.
        with np.errstate(invalid="ignore"):
            begin = np.maximum(np.trunc(lo.astype(np.float64) - 3 * sigma), 0)
            end = np.minimum(np.trunc(hi.astype(np.float64) + 3 * sigma) + 1, n)
            idx = np.arange(n)
            return (idx >= begin[..., None]) & (idx < end[..., None])

    def point(x, y, peak, active):
        # x, y, peak, active: (...,) -> (..., H, W)
        with np.errstate(invalid="ignore", over="ignore"):
            d2 = (xs - x[..., None, None]) ** 2 + (ys - y[..., None, None]) ** 2
            value = np.exp(-d2 / 2 / s2) * peak[..., None, None]
        mask = axis_mask(y, y, h)[..., :, None] & axis_mask(x, x, w)[..., None, :] & active[..., None, None]
        return np.where(mask, value, np.float32(0))

    channels = []
    if with_joints:
        with np.errstate(invalid="ignore"):
            active = np.isfinite(sc) & (sc.astype(np.float64) >= eps)
        channels.append(point(kp[..., 0], kp[..., 1], sc, active))  # (N, M, T, V, H, W)
    if len(limbs):
        a_idx = np.array([a for a, _ in limbs])
        b_idx = np.array([b for _, b in limbs])
        a, b = kp[..., a_idx, :], kp[..., b_idx, :]  # (N, M, T, L, 2)
        sa, sb = sc[..., a_idx], sc[..., b_idx]
        peak = np.minimum(sa, sb)
        with np.errstate(invalid="ignore"):
            active = np.isfinite(sa) & np.isfinite(sb) & (peak.astype(np.float64) >= eps)
        active &= np.isfinite(a).all(-1) & np.isfinite(b).all(-1)
        with np.errstate(invalid="ignore", over="ignore"):
            # float64 sums of the float32 differences (NumPy 1.x scalar promotion), used as float32 below.
            d2ab64 = ((a[..., 0] - b[..., 0]).astype(np.float64) ** 2
                      + (a[..., 1] - b[..., 1]).astype(np.float64) ** 2)
            d2ab = d2ab64.astype(np.float32)
        short = d2ab64 < 1
        # Shorter than a pixel: joint a's Gaussian, with a's score and window.
        fallback = point(a[..., 0], a[..., 1], sa, active & short)
        ax, ay, bx, by = (v[..., None, None] for v in (a[..., 0], a[..., 1], b[..., 0], b[..., 1]))
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            d2a = (xs - ax) ** 2 + (ys - ay) ** 2
            d2b = (xs - bx) ** 2 + (ys - by) ** 2
            t = (d2a - d2b + d2ab[..., None, None]) / 2 / d2ab[..., None, None]
            d2l = (xs - (ax + t * (bx - ax))) ** 2 + (ys - (ay + t * (by - ay))) ** 2
            d2 = np.where(t <= 0, d2a, np.where(t >= 1, d2b, d2l))
            value = np.exp(-d2 / 2 / s2) * peak[..., None, None]
        mask = (axis_mask(np.minimum(a[..., 1], b[..., 1]), np.maximum(a[..., 1], b[..., 1]), h)[..., :, None]
                & axis_mask(np.minimum(a[..., 0], b[..., 0]), np.maximum(a[..., 0], b[..., 0]), w)[..., None, :]
                & (active & ~short)[..., None, None])
        channels.append(np.maximum(fallback, np.where(mask, value, np.float32(0))))
    stamps = np.concatenate(channels, axis=3)  # (N, M, T, C, H, W)
    out = stamps.max(axis=1) if stamps.shape[1] else np.zeros(stamps.shape[:1] + stamps.shape[2:], np.float32)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(0, 2, 1, 3, 4)))


def make_inputs(n=2, m=3, t=4, v=17, size=(23, 31), seed=0, device="cpu", special=True):
    """Keypoints spread from well outside to well inside the image, scores in [0, 1) with zeros, tiny scores (on
    both sides of mmaction2's eps 1e-4 and pyskl's 1e-3), NaN and infinite coordinates and scores, and zero-length
    limbs mixed in (when `special`)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    kp = torch.rand(n, m, t, v, 2, generator=g) * torch.tensor([w + 16.0, h + 16.0]) - 8
    scores = torch.rand(n, m, t, v, generator=g)
    if special:
        flat_kp = kp.view(-1, v, 2)
        flat_sc = scores.view(-1, v)
        frames = flat_kp.shape[0]
        pick = torch.randint(0, frames, (11,), generator=g)
        flat_sc[pick[0], 1] = 0.0
        flat_sc[pick[1], 2] = 5e-5  # below eps
        flat_sc[pick[2], 3] = 1.5e-4  # just above eps
        flat_sc[pick[7], 3] = 5e-4  # drawn with mmaction2's eps, not with pyskl's
        flat_sc[pick[8], 8] = float("inf")  # the end of limb (6, 8), the start of (8, 10)
        flat_sc[pick[9], 11] = -float("inf")
        flat_sc[pick[10], 13] = float("inf")
        flat_kp[pick[3], 4, 0] = float("nan")
        flat_kp[pick[4], 5, 1] = float("inf")
        flat_kp[pick[5], 6] = flat_kp[pick[5], 5]  # a zero-length limb (5, 6) and two coinciding joints
        flat_sc[pick[6], 7] = float("nan")  # the end of limbs (5, 7) and the start of (7, 9)
        flat_kp[:, 0] = flat_kp[:, 1] + torch.rand(frames, 2, generator=g) * 0.6  # limb (0, 1) under 1 px
        # Persons 0 and 1 overlap: person 1 is person 0 moved by up to a pixel.
        if m > 1:
            kp[:, 1] = kp[:, 0] + torch.rand(n, t, v, 2, generator=g) * 2 - 1
    return kp.to(device), scores.to(device)


def ntu_limbs(v):
    return NTU25_BONES if v == 25 else COCO17_LIMBS


# ---- values ------------------------------------------------------------------------------------------------------

def test_poisoning_is_active():
    with poisoned_allocations():
        assert torch.empty(64).isnan().all(), "the NaN poisoning the tests rely on is not in effect"


CASES = [  # (v, size, sigma, with_joints, with_limbs)
    (17, (56, 56), 0.6, True, False),
    (17, (56, 56), 0.6, True, True),
    (17, (23, 31), 0.3, True, True),
    (17, (31, 23), 1.7, False, True),
    (25, (40, 29), 0.6, True, True),
    (25, (17, 48), 3.0, True, True),
    (17, (1, 9), 0.6, True, True),
]


@pytest.mark.parametrize("v,size,sigma,with_joints,with_limbs", CASES)
def test_matches_reference(v, size, sigma, with_joints, with_limbs, device):
    kp, scores = make_inputs(v=v, size=size, device=device, seed=v + size[0])
    limbs = ntu_limbs(v) if with_limbs else None
    with poisoned_allocations():
        out = render_heatmaps(kp, scores, size, sigma, limbs, with_joints)
    c = (v if with_joints else 0) + (len(limbs) if limbs else 0)
    assert out.shape == (kp.shape[0], c, kp.shape[2]) + size and out.dtype == torch.float32
    assert out.device == kp.device and out.is_contiguous()
    assert not out.isnan().any(), "an output element was not written (or NaN leaked from a missing joint)"
    expected = dense_reference(kp, scores, size, sigma, limbs or (), with_joints)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("sigma", [0.3, 0.6, 1.0, 2.2, 3.0])
def test_sigma_range(sigma, device):
    kp, scores = make_inputs(n=1, m=2, t=3, size=(20, 26), device=device, seed=int(sigma * 10))
    out = render_heatmaps(kp, scores, (20, 26), sigma, COCO17_LIMBS)
    torch.testing.assert_close(out.cpu(), dense_reference(kp, scores, (20, 26), sigma, COCO17_LIMBS), rtol=0,
                               atol=ATOL)


def test_the_numpy_reference_matches_the_dense_reference():
    kp, scores = make_inputs(v=17, size=(21, 27), seed=11)
    for limbs, with_joints in [(None, True), (COCO17_LIMBS, True), (COCO17_LIMBS, False)]:
        ours = render_heatmaps_reference(kp, scores, (21, 27), 0.6, limbs, with_joints)
        torch.testing.assert_close(ours, dense_reference(kp, scores, (21, 27), 0.6, limbs or (), with_joints),
                                   rtol=0, atol=1e-7)


def test_scores_default_to_one(device):
    kp, _ = make_inputs(n=1, m=2, t=2, device=device, special=False)
    ones = torch.ones(kp.shape[:-1], device=device)
    torch.testing.assert_close(render_heatmaps(kp, None, (23, 31), limbs=COCO17_LIMBS),
                               render_heatmaps(kp, ones, (23, 31), limbs=COCO17_LIMBS), rtol=0, atol=0)


def test_batch_equals_per_sample(device):
    kp, scores = make_inputs(n=5, m=2, t=3, device=device, seed=3)
    batch = render_heatmaps(kp, scores, (23, 31), 0.6, COCO17_LIMBS)
    for n in range(kp.shape[0]):
        single = render_heatmaps(kp[n:n + 1], scores[n:n + 1], (23, 31), 0.6, COCO17_LIMBS)
        torch.testing.assert_close(batch[n:n + 1], single, rtol=0, atol=0)


def test_non_contiguous_inputs(device):
    kp, scores = make_inputs(n=2, m=3, t=4, device=device, seed=5)
    kp_view = kp.transpose(1, 2).contiguous().transpose(1, 2)  # (N, M, T, V, 2) with T outermost in memory
    scores_view = torch.cat([scores, scores], dim=3)[..., ::2][..., :17]
    scores_view.copy_(scores)
    assert not kp_view.is_contiguous() and not scores_view.is_contiguous()
    torch.testing.assert_close(render_heatmaps(kp_view, scores_view, (23, 31), 0.6, COCO17_LIMBS),
                               render_heatmaps(kp, scores, (23, 31), 0.6, COCO17_LIMBS), rtol=0, atol=0)


@pytest.mark.parametrize("out_dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_output_dtypes_are_the_float32_result_rounded(out_dtype, device):
    kp, scores = make_inputs(n=2, m=2, t=3, device=device, seed=7)
    expected = render_heatmaps(kp, scores, (23, 31), 0.6, COCO17_LIMBS).to(out_dtype)
    with poisoned_allocations():
        out = render_heatmaps(kp, scores, (23, 31), 0.6, COCO17_LIMBS, dtype=out_dtype)
    assert out.dtype == out_dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("in_dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_input_dtypes_are_computed_in_float32(in_dtype, device):
    kp, scores = make_inputs(n=1, m=2, t=3, device=device, seed=8)
    kp, scores = kp.to(in_dtype), scores.to(in_dtype)
    torch.testing.assert_close(render_heatmaps(kp, scores, (23, 31), 0.6, COCO17_LIMBS),
                               render_heatmaps(kp.float(), scores.float(), (23, 31), 0.6, COCO17_LIMBS), rtol=0,
                               atol=0)


# ---- GeneratePoseTarget's rules, one at a time, against closed forms ------------------------------------------------

def _one(kp_xy, score=1.0, size=(16, 16), sigma=0.6, limbs=None, device="cpu", **kwargs):
    """Render one frame of one person whose joints are `kp_xy` (V, 2)."""
    kp = torch.tensor(kp_xy, dtype=torch.float32, device=device).view(1, 1, 1, -1, 2)
    scores = torch.as_tensor(score, dtype=torch.float32, device=device).expand(kp.shape[:-1]).contiguous()
    return render_heatmaps(kp, scores, size, sigma, limbs, **kwargs)[0, :, 0].cpu()


def _gauss(d2, sigma=0.6):
    return math.exp(-d2 / (2 * sigma * sigma))


def test_joint_window_is_truncated_asymmetrically(device):
    # m = 10: window [int(8.2), int(11.8) + 1) = [8, 12): pixel 8 (2 px left) is drawn, pixel 12 (2 px right) not.
    hm = _one([[10.0, 5.0]], device=device)[0]
    assert hm[5, 10] == pytest.approx(1.0)
    assert hm[5, 8] == pytest.approx(_gauss(4.0), rel=1e-6)
    assert hm[5, 12] == 0 and hm[5, 7] == 0
    assert hm[3, 10] == pytest.approx(_gauss(4.0), rel=1e-6) and hm[7, 10] == 0
    assert (hm > 0).sum() == 16


def test_int_truncates_toward_zero_outside_the_image(device):
    # x = -2: int(-2 + 1.8) + 1 = 1, so column 0 (2 px away) is drawn; x = -2.9: int(-1.1) + 1 = 0, nothing.
    hm = _one([[-2.0, 5.0]], device=device)[0]
    assert hm[5, 0] == pytest.approx(_gauss(4.0), rel=1e-6) and hm[:, 1:].max() == 0
    assert _one([[-2.9, 5.0]], device=device).max() == 0
    # Beyond the right edge the bound is int(x - 1.8), so x = 17.7 (W = 16) reaches column 15.
    assert _one([[17.7, 5.0]], device=device)[0, 5, 15] == pytest.approx(_gauss(2.7 ** 2), rel=1e-5)


def test_score_is_the_peak_and_eps_skips(device):
    assert _one([[4.0, 4.0]], score=0.37, device=device)[0, 4, 4] == pytest.approx(0.37)
    assert _one([[4.0, 4.0]], score=9.9e-5, device=device).max() == 0
    # float32(1e-4) is just below 1e-4 and float32(1e-3) just above 1e-3: the original compares them with the
    # Python float eps, so the first is skipped and the second drawn.
    assert _one([[4.0, 4.0]], score=1e-4, device=device).max() == 0
    assert _one([[4.0, 4.0]], score=1e-3, eps=1e-3, device=device)[0, 4, 4] == pytest.approx(1e-3)
    assert _one([[4.0, 4.0]], score=0.5, eps=0.6, device=device).max() == 0


def test_default_eps_is_the_authors_mmaction2_value(device):
    # EPAM-Net's authors render with mmaction2's GeneratePoseTarget (eps 1e-4), pyskl's copy uses 1e-3: a joint
    # scored 5e-4 is drawn by default, and only with eps=1e-3 skipped. Every entry point has the same default.
    kp = torch.tensor([[4.0, 4.0]], device=device).view(1, 1, 1, 1, 2)
    scores = torch.full((1, 1, 1, 1), 5e-4, device=device)
    for render in (render_heatmaps, render_heatmaps_reference,
                   lambda k, s, size: torch.ops.epamx.render_heatmaps(k, s, [size, size])):
        assert render(kp, scores, 9)[0, 0, 0, 4, 4].item() == pytest.approx(5e-4), render
    assert render_heatmaps(kp, scores, 9, eps=1e-3).max() == 0
    assert render_heatmaps_reference(kp, scores, 9, eps=1e-3).max() == 0


def test_max_over_persons(device):
    kp = torch.tensor([[[[[5.0, 5.0]]], [[[6.0, 5.0]]]]], device=device)  # (1, 2, 1, 1, 2)
    scores = torch.tensor([[[[0.9]], [[0.5]]]], device=device)
    hm = render_heatmaps(kp, scores, (12, 12))[0, 0, 0].cpu()
    assert hm[5, 5] == pytest.approx(0.9)
    assert hm[5, 6] == pytest.approx(max(0.9 * _gauss(1.0), 0.5)) and hm[5, 6] == pytest.approx(0.5)
    assert hm[5, 7] == pytest.approx(max(0.9 * _gauss(4.0), 0.5 * _gauss(1.0)), rel=1e-6)


def test_limb_distance_to_segment_and_min_score(device):
    # Limb from (3, 8) to (12, 8), scores 0.8 and 0.4: along the segment the value is min = 0.4; beyond the end
    # it falls off with the distance to the end point; off the line with the distance to the line.
    kp = torch.tensor([[3.0, 8.0], [12.0, 8.0]], device=device).view(1, 1, 1, 2, 2)
    scores = torch.tensor([0.8, 0.4], device=device).view(1, 1, 1, 2)
    hm = render_heatmaps(kp, scores, (16, 20), limbs=[(0, 1)], with_joints=False)[0, 0, 0].cpu()
    assert hm[8, 3:13] == pytest.approx(torch.full((10,), 0.4))
    assert hm[7, 7] == pytest.approx(0.4 * _gauss(1.0), rel=1e-6)
    assert hm[8, 13] == pytest.approx(0.4 * _gauss(1.0), rel=1e-6)
    # The window is [int(3 - 1.8), int(12 + 1.8) + 1) = [1, 14): 2 px beyond the start, 1 px beyond the end.
    assert hm[8, 1] == pytest.approx(0.4 * _gauss(4.0), rel=1e-6)
    assert hm[8, 14] == 0 and hm[8, 0] == 0


def test_limb_shorter_than_a_pixel_is_its_start_joint(device):
    # Segment of length 0.5: drawn as joint 0's Gaussian with joint 0's own score (0.9), not the min (0.2).
    kp = torch.tensor([[6.0, 6.0], [6.3, 6.4]], device=device).view(1, 1, 1, 2, 2)
    scores = torch.tensor([0.9, 0.2], device=device).view(1, 1, 1, 2)
    hm = render_heatmaps(kp, scores, (12, 12), limbs=[(0, 1)])[0, :, 0].cpu()
    torch.testing.assert_close(hm[2], hm[0], rtol=0, atol=0)
    # ... but the min of both scores still decides whether it is drawn.
    scores[..., 1] = 5e-5
    assert render_heatmaps(kp, scores, (12, 12), limbs=[(0, 1)])[0, 2, 0].max() == 0


def test_zero_length_limb(device):
    kp = torch.tensor([[6.0, 6.0], [6.0, 6.0]], device=device).view(1, 1, 1, 2, 2)
    hm = render_heatmaps(kp, None, (12, 12), limbs=[(0, 1)])[0, :, 0].cpu()
    torch.testing.assert_close(hm[2], hm[0], rtol=0, atol=0)


def test_missing_joints_and_nan_scores_draw_nothing(device):
    # Deliberate differences from the original (which raises on int(nan) and writes NaN for a NaN score).
    for bad in [float("nan"), float("inf"), -float("inf")]:
        hm = _one([[bad, 5.0], [5.0, 5.0]], limbs=[(0, 1)], device=device)
        assert hm[0].max() == 0 and hm[2].max() == 0 and hm[1, 5, 5] == 1
    kp = torch.tensor([[5.0, 5.0]], device=device).view(1, 1, 1, 1, 2)
    assert render_heatmaps(kp, torch.full((1, 1, 1, 1), float("nan"), device=device), (9, 9)).max() == 0
    # A limb with a NaN score at either end draws nothing (min() in the original would keep the other score).
    kp = torch.tensor([[2.0, 5.0], [7.0, 5.0]], device=device).view(1, 1, 1, 2, 2)
    for scores in ([float("nan"), 0.5], [0.5, float("nan")]):
        sc = torch.tensor(scores, device=device).view(1, 1, 1, 2)
        assert render_heatmaps(kp, sc, (9, 9), limbs=[(0, 1)], with_joints=False).max() == 0


NON_FINITE = [float("inf"), -float("inf"), float("nan")]


@pytest.mark.parametrize("bad", NON_FINITE, ids=["inf", "-inf", "nan"])
def test_non_finite_scores_are_missing_joints(bad, device):
    # An infinite peak would draw inf pixels (and NaN where the Gaussian underflows, inf * 0). Every non-finite
    # score means "missing", whichever entry point renders: the same heatmaps as a score of 0 (below eps) there.
    kp = torch.tensor([[2.0, 5.0], [7.0, 5.0], [4.0, 1.5]], device=device).view(1, 1, 1, 3, 2)
    limbs = [(0, 1), (1, 2), (2, 0)]
    flat = [j for pair in limbs for j in pair]
    for joint in range(3):
        scores = torch.tensor([0.9, 0.6, 0.8], device=device)
        scores[joint] = bad
        missing = scores.clone()
        missing[joint] = 0
        scores, missing = scores.view(1, 1, 1, 3), missing.view(1, 1, 1, 3)
        expected = render_heatmaps(kp, missing, (9, 9), 0.6, limbs)
        assert expected.max() > 0.5  # the other joints, and the limb between them, are drawn
        threads = torch.arange(_count_threads(expected.shape))
        renders = {  # name: (heatmaps, tolerance); the NumPy renderers use np.exp, the kernels their polynomial
            "op": (render_heatmaps(kp, scores, (9, 9), 0.6, limbs), 0),
            "gpu thread bodies": (_C._testing.render_heatmaps_run_thread_bodies(
                kp.cpu(), scores.cpu(), [9, 9], 0.6, flat, True, 1e-4, None, threads), 0),
            "numpy reference": (render_heatmaps_reference(kp, scores, (9, 9), 0.6, limbs), ATOL),
            "dense reference": (dense_reference(kp, scores, (9, 9), 0.6, limbs), ATOL),
        }
        for name, (out, atol) in renders.items():
            assert out.isfinite().all(), name
            torch.testing.assert_close(out.cpu(), expected.cpu(), rtol=0, atol=atol, msg=name)


def test_infinite_scores_on_a_long_limb_draw_nothing(device):
    # inf * exp(-d2) is inf near the segment and inf * 0 = NaN far from it; neither may appear.
    kp = torch.tensor([[0.0, 0.0], [30.0, 30.0]], device=device).view(1, 1, 1, 2, 2)
    scores = torch.full((1, 1, 1, 2), float("inf"), device=device)
    assert render_heatmaps(kp, scores, (32, 32), 0.3, limbs=[(0, 1)]).max() == 0


def test_far_away_coordinates_do_not_overflow(device):
    hm = _one([[3e38, -3e38], [5.0, 5.0], [1e30, 5.0]], limbs=[(0, 1), (1, 2)], device=device)
    assert not hm.isnan().any()
    assert hm[0].max() == 0 and hm[2].max() == 0 and hm[1, 5, 5] == 1
    assert hm[4, 5, 5] > 0  # the limb towards x = 1e30 still passes through (5, 5)


# ---- the CUDA kernel's thread body, run on the CPU ------------------------------------------------------------------

@pytest.mark.parametrize("v,with_joints,out_dtype", [(17, True, None), (17, False, torch.float16),
                                                      (25, True, torch.bfloat16), (25, True, torch.float64)])
def test_gpu_thread_bodies_match_the_cpu_kernel(v, with_joints, out_dtype):
    kp, scores = make_inputs(n=2, m=3, t=2, v=v, size=(13, 19), seed=v)
    limbs = ntu_limbs(v)
    flat = [j for pair in limbs for j in pair]
    expected = render_heatmaps(kp, scores, (13, 19), 0.9, limbs, with_joints, dtype=out_dtype)
    threads = _count_threads(expected.shape)
    g = torch.Generator().manual_seed(1)
    for order in [torch.arange(threads), torch.randperm(threads, generator=g)]:
        with poisoned_allocations():
            out = _C._testing.render_heatmaps_run_thread_bodies(kp, scores, [13, 19], 0.9, flat, with_joints, 1e-4,
                                                                out_dtype, order)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out = _C._testing.render_heatmaps_run_thread_bodies(kp, None, [13, 19], 0.9, None, True, 1e-4, None,
                                                        torch.arange(_count_threads((2, v, 2, 13, 19))))
    torch.testing.assert_close(out, render_heatmaps(kp, None, (13, 19), 0.9), rtol=0, atol=0)


def _count_threads(shape):
    """Threads of the CUDA kernel: one per run of up to 4 pixels along each output row."""
    n, c, t, h, w = shape
    return n * c * t * h * -(-w // 4)


@pytest.mark.parametrize("width", [1, 3, 4, 5, 8, 11])
def test_gpu_thread_bodies_cover_every_row_length(width):
    kp, scores = make_inputs(n=1, m=2, t=2, v=17, size=(6, width), seed=width)
    expected = render_heatmaps(kp, scores, (6, width), 0.6, COCO17_LIMBS)
    with poisoned_allocations():
        out = _C._testing.render_heatmaps_run_thread_bodies(
            kp, scores, [6, width], 0.6, [j for pair in COCO17_LIMBS for j in pair], True, 1e-4, None,
            torch.randperm(_count_threads(expected.shape)))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_thread_body_hook_checks_its_order():
    kp, scores = make_inputs(n=1, m=1, t=1, v=2, size=(3, 3), special=False)
    with pytest.raises(ValueError, match="thread_order must list all 6"):
        _C._testing.render_heatmaps_run_thread_bodies(kp, scores, [3, 3], 0.6, None, True, 1e-4, None,
                                                      torch.arange(5))


# ---- gradients, dispatcher, fake kernel, torch.compile ------------------------------------------------------------

def test_requesting_a_gradient_is_an_error(device):
    kp, scores = make_inputs(n=1, m=2, t=2, device=device, special=False)
    kp.requires_grad_(True)
    out = render_heatmaps(kp, scores, (23, 31), limbs=COCO17_LIMBS)
    with pytest.raises(RuntimeError, match="no gradient with respect to keypoints or scores"):
        out.sum().backward()
    assert not render_heatmaps(kp.detach(), scores, (23, 31)).requires_grad
    compiled = torch.compile(lambda k, s: render_heatmaps(k, s, (23, 31)) * 2, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="no gradient with respect to keypoints or scores"):
        compiled(kp, scores)


# Only inputs that do not require grad: with ones that do, opcheck's AOTAutograd check runs the backward, which
# raises by design (test_requesting_a_gradient_is_an_error).
@pytest.mark.parametrize("limbs,dtype", [(None, None), (COCO17_LIMBS, torch.bfloat16)])
def test_opcheck(limbs, dtype, device):
    kp, scores = make_inputs(n=2, m=2, t=3, device=device, seed=9)
    flat = [j for pair in limbs for j in pair] if limbs else None
    torch.library.opcheck(torch.ops.epamx.render_heatmaps.default, (kp, scores, [23, 31], 0.6, flat, True, 1e-4,
                                                                    dtype))
    torch.library.opcheck(torch.ops.epamx.render_heatmaps.default, (kp, None, [9, 7], 1.5, flat, flat is None,
                                                                    1e-3, dtype))


def test_meta_tensors():
    kp = torch.empty(3, 2, 48, 17, 2, device="meta")
    assert render_heatmaps(kp, None, (56, 56)).shape == (3, 17, 48, 56, 56)
    out = render_heatmaps(kp, torch.empty(3, 2, 48, 17, device="meta"), (40, 56), limbs=COCO17_LIMBS,
                          dtype=torch.float16)
    assert out.shape == (3, 34, 48, 40, 56) and out.dtype == torch.float16
    assert render_heatmaps(kp, None, 56, limbs=COCO17_LIMBS, with_joints=False).shape == (3, 17, 48, 56, 56)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend, device):
    def f(kp, scores):
        return render_heatmaps(kp * 1.0, scores, (23, 31), 0.6, COCO17_LIMBS).sum(dim=2) * 2

    kp, scores = make_inputs(n=2, m=2, t=3, device=device, seed=10)
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(kp, scores), f(kp, scores), rtol=0, atol=0)


# ---- edge cases ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 2, 3, 17), (2, 2, 0, 17), (2, 0, 3, 17), (2, 2, 3, 0)])
def test_empty_inputs(shape, device):
    kp = torch.rand(shape + (2,), device=device) * 10
    with poisoned_allocations():
        out = render_heatmaps(kp, torch.ones(shape, device=device), (5, 6))
    assert out.shape == (shape[0], shape[3], shape[2], 5, 6)
    assert (out == 0).all(), "with no persons every pixel is 0"


def test_no_persons_with_limbs_renders_zeros(device):
    out = render_heatmaps(torch.empty(2, 0, 3, 17, 2, device=device), None, (5, 6), limbs=COCO17_LIMBS)
    assert out.shape == (2, 34, 3, 5, 6) and (out == 0).all()


# ---- bad input ---------------------------------------------------------------------------------------------------

def _kp(d, *shape):
    return torch.rand(*(shape or (1, 2, 3, 17, 2)), device=d)


BAD_INPUTS = [
    ("keypoints 4-D", lambda d: render_heatmaps(_kp(d, 2, 3, 17, 2)), ValueError,
     r"keypoints must be 5-D \(N, M, T, V, 2\)"),
    ("keypoints last dim 3", lambda d: render_heatmaps(_kp(d, 1, 2, 3, 17, 3)), ValueError,
     r"keypoints must be 5-D .* got shape \[1, 2, 3, 17, 3\]"),
    ("keypoints int", lambda d: render_heatmaps(torch.ones(1, 2, 3, 17, 2, dtype=torch.int32, device=d)), TypeError,
     "keypoints must be a floating tensor"),
    ("scores int", lambda d: render_heatmaps(_kp(d), torch.ones(1, 2, 3, 17, dtype=torch.int64, device=d)),
     TypeError, "scores must be a floating tensor"),
    ("scores M mismatch", lambda d: render_heatmaps(_kp(d), torch.rand(1, 3, 3, 17, device=d)), ValueError,
     r"scores must have shape \(N, M, T, V\) = \[1, 2, 3, 17\] to match keypoints, got \[1, 3, 3, 17\]"),
    ("scores T mismatch", lambda d: render_heatmaps(_kp(d), torch.rand(1, 2, 4, 17, device=d)), ValueError,
     "scores must have shape"),
    ("scores V mismatch", lambda d: render_heatmaps(_kp(d), torch.rand(1, 2, 3, 25, device=d)), ValueError,
     "scores must have shape"),
    ("scores 5-D", lambda d: render_heatmaps(_kp(d), torch.rand(1, 2, 3, 17, 1, device=d)), ValueError,
     "scores must have shape"),
    ("scores on meta", lambda d: torch.ops.epamx.render_heatmaps(_kp(d), torch.rand(1, 2, 3, 17, device="meta"),
                                                                [5, 5], 0.6, None, True, 1e-4, None),
     RuntimeError, "keypoints and scores must be on the same device"),
    ("size 0", lambda d: render_heatmaps(_kp(d), None, (0, 56)), ValueError,
     r"size must be \(H, W\) with H >= 1 and W >= 1, got \[0, 56\]"),
    ("size negative", lambda d: render_heatmaps(_kp(d), None, -3), ValueError, "size must be"),
    ("sigma 0", lambda d: render_heatmaps(_kp(d), None, 8, sigma=0.0), ValueError,
     "sigma must be a finite number > 0, got 0"),
    ("sigma negative", lambda d: render_heatmaps(_kp(d), None, 8, sigma=-1.0), ValueError, "sigma must be"),
    ("sigma nan", lambda d: render_heatmaps(_kp(d), None, 8, sigma=float("nan")), ValueError, "sigma must be"),
    ("limb index V", lambda d: render_heatmaps(_kp(d), None, 8, limbs=[(0, 1), (16, 17)]), ValueError,
     r"limbs\[1\] = \(16, 17\) names a joint outside \[0, V\) for V = 17"),
    ("limb index negative", lambda d: render_heatmaps(_kp(d), None, 8, limbs=[(-1, 1)]), ValueError,
     r"limbs\[0\] = \(-1, 1\)"),
    ("NTU bones on COCO", lambda d: render_heatmaps(_kp(d), None, 8, limbs=NTU25_BONES), ValueError,
     "names a joint outside"),
    ("limb triple", lambda d: render_heatmaps(_kp(d), None, 8, limbs=[(0, 1, 2)]), ValueError,
     r"limbs must be \(start, end\) joint pairs"),
    ("limb tensor float", lambda d: render_heatmaps(_kp(d), None, 8, limbs=torch.zeros(3, 2)), ValueError,
     r"limbs must be an integer \(L, 2\) tensor"),
    ("limbs odd flat", lambda d: torch.ops.epamx.render_heatmaps(_kp(d), None, [8, 8], 0.6, [0, 1, 2], True, 1e-3,
                                                                None), ValueError, "odd count of 3 values"),
    ("nothing to render", lambda d: render_heatmaps(_kp(d), None, 8, with_joints=False), ValueError,
     "nothing to render: with_joints is False and limbs is empty"),
    ("int dtype", lambda d: render_heatmaps(_kp(d), None, 8, dtype=torch.int32), TypeError,
     "dtype must be float32, float64, float16 or bfloat16"),
]


@pytest.mark.parametrize("call,error,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_explained(call, error, message, device):
    with pytest.raises(error, match=message):
        call(device)


def test_limbs_as_a_tensor(device):
    kp, scores = make_inputs(n=1, m=2, t=2, device=device)
    torch.testing.assert_close(render_heatmaps(kp, scores, (23, 31), limbs=torch.tensor(COCO17_LIMBS)),
                               render_heatmaps(kp, scores, (23, 31), limbs=COCO17_LIMBS), rtol=0, atol=0)


# ---- CUDA specifics --------------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA GPU")


@cuda_only
def test_cuda_matches_cpu_up_to_rounding():
    kp, scores = make_inputs(n=3, m=2, t=5, v=25, size=(56, 56), seed=12)
    cpu = render_heatmaps(kp, scores, 56, 0.6, NTU25_BONES)
    gpu = render_heatmaps(kp.cuda(), scores.cuda(), 56, 0.6, NTU25_BONES)
    # Same formulas; nvcc may fuse multiply-adds where GCC does not.
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=ATOL)


@cuda_only
def test_cuda_uses_the_current_stream():
    kp, scores = make_inputs(n=8, m=2, t=48, size=(56, 56), seed=13)
    out = on_busy_side_stream(lambda x: render_heatmaps(x, scores.cuda(), 56, limbs=COCO17_LIMBS), kp.cuda())
    torch.testing.assert_close(out.cpu(), render_heatmaps(kp, scores, 56, limbs=COCO17_LIMBS), rtol=0, atol=ATOL)
