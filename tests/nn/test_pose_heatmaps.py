"""PoseHeatmaps against a NumPy port, written here from pyskl's documented behaviour, of PoseCompact(hw_ratio,
allow_imgpad) -> Resize(keep_ratio=False) -> epamx's flip, clip by clip; then rendering by render_heatmaps."""
import numpy as np
import pytest
import torch

from epamx.nn import PoseHeatmaps
from epamx.ops import COCO17_FLIP_PAIRS, COCO17_LIMBS, NTU25_BONES, NTU25_FLIP_PAIRS, render_heatmaps


def compact_resize_flip(kp, img_shape, size=(56, 56), padding=0.25, threshold=10, hw_ratio=1.0, allow_imgpad=True,
                        flip=False, flip_pairs=COCO17_FLIP_PAIRS):
    """One clip: kp (M, T, V, 2) float32 in image pixels -> heatmap pixels; NumPy 1.x promotion emulated."""
    kp = kp.astype(np.float32).copy()
    h, w = img_shape
    x, y = kp[..., 0], kp[..., 1]
    vx = np.isfinite(x) & (x != 0)
    vy = np.isfinite(y) & (y != 0)
    min_x, max_x = np.min(x[vx], initial=np.inf), np.max(x[vx], initial=-np.inf)
    min_y, max_y = np.min(y[vy], initial=np.inf), np.max(y[vy], initial=-np.inf)
    if max_x - min_x < threshold or max_y - min_y < threshold:
        x0, y0, x1, y1 = 0, 0, w, h
    else:
        cx, cy = float(np.float32(max_x + min_x)) / 2, float(np.float32(max_y + min_y)) / 2
        hw = float(np.float32(max_x - min_x)) / 2 * (1 + padding)
        hh = float(np.float32(max_y - min_y)) / 2 * (1 + padding)
        if hw_ratio is not None:
            hh = max(hw_ratio * hw, hh)
            hw = max(1 / hw_ratio * hh, hw)
        x0, x1, y0, y1 = cx - hw, cx + hw, cy - hh, cy + hh
        if allow_imgpad:
            x0, y0, x1, y1 = int(x0), int(y0), int(x1), int(y1)
        else:
            x0, y0, x1, y1 = int(max(0, x0)), int(max(0, y0)), int(min(w, x1)), int(min(h, y1))
    with np.errstate(invalid="ignore"):
        x[x != 0] -= x0
        y[y != 0] -= y0
        x *= np.float32(size[1] / (x1 - x0))
        y *= np.float32(size[0] / (y1 - y0))
        if flip:
            x[x != 0] = (size[1] - 1) - x[x != 0]
    order = list(range(kp.shape[2]))
    if flip:
        for left, right in flip_pairs:
            order[left], order[right] = right, left
    return kp[:, :, order], order


def make_clips(n=5, m=2, t=6, v=17, seed=0):
    """The first n of 5 clips: persons somewhere in 1080p and 480p frames; missing joints as 0 (x, y or both) and
    NaN; clip 3 is a tiny pose (no crop), clip 4 has no valid joint at all."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[1080, 1920], [480, 640], [1080, 1920], [480, 640], [720, 1280]], dtype=torch.float32)
    n, keep = 5, n
    origin = torch.rand(n, 1, 1, 1, 2, generator=g) * shapes.flip(-1).view(n, 1, 1, 1, 2) * 0.5
    extent = torch.rand(n, 1, 1, 1, 2, generator=g) * 300 + 40
    kp = origin + torch.rand(n, m, t, v, 2, generator=g) * extent
    kp[3] = kp[3, 0, 0, 0] + torch.rand(m, t, v, 2, generator=g) * 5
    kp[4] = 0
    kp[0, 0, 1, 3, 0] = 0
    kp[0, 1, 2, 4, 1] = 0
    kp[1, 0, 0, 5] = 0
    kp[2, 1, 3, 6, 0] = float("nan")
    scores = torch.rand(n, m, t, v, generator=g)
    return kp[:keep], scores[:keep], shapes[:keep]


@pytest.mark.parametrize("allow_imgpad,hw_ratio", [(True, 1.0), (False, 1.0), (True, None), (True, 0.5)])
def test_coordinates_match_pyskl(allow_imgpad, hw_ratio, device):
    kp, scores, shapes = make_clips()
    flip = torch.tensor([False, True, False, True, True])
    module = PoseHeatmaps(allow_imgpad=allow_imgpad, hw_ratio=hw_ratio)
    got, got_scores = module.to_heatmap_coordinates(kp.to(device), scores.to(device), shapes.to(device),
                                                    flip.to(device))
    for i in range(kp.shape[0]):
        expected, order = compact_resize_flip(kp[i].numpy(), tuple(shapes[i].tolist()), allow_imgpad=allow_imgpad,
                                              hw_ratio=hw_ratio, flip=bool(flip[i]))
        torch.testing.assert_close(got[i].cpu(), torch.from_numpy(expected), rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got_scores[i].cpu(), scores[i][..., order], rtol=0, atol=0)


def test_the_crop_is_square_and_padded():
    # One person spanning x in [100, 300], y in [200, 300]: centre (200, 250), half sizes 125 x 62.5 -> square
    # 125 x 125: box [75, 325) x [125, 375), scaled by 56 / 250.
    kp = torch.tensor([[100.0, 200.0], [300.0, 300.0], [200.0, 250.0]]).view(1, 1, 1, 3, 2)
    got, _ = PoseHeatmaps(flip_pairs=()).to_heatmap_coordinates(kp, None, (1080, 1920))
    s = np.float32(56 / 250)
    expected = torch.tensor([[25 * s, 75 * s], [225 * s, 175 * s], [125 * s, 125 * s]])
    torch.testing.assert_close(got.view(3, 2), expected, rtol=0, atol=0)


def test_small_poses_are_not_cropped():
    kp = torch.tensor([[100.0, 200.0], [105.0, 260.0]]).view(1, 1, 1, 2, 2)
    got, _ = PoseHeatmaps(flip_pairs=()).to_heatmap_coordinates(kp, None, (480, 640))
    expected = kp * torch.tensor([np.float32(56 / 640), np.float32(56 / 480)])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_flip_mirrors_pixel_centres_and_swaps_sides():
    kp, scores, shapes = make_clips(n=3)
    module = PoseHeatmaps()
    plain, plain_scores = module.to_heatmap_coordinates(kp, scores, shapes)
    flipped, flipped_scores = module.to_heatmap_coordinates(kp, scores, shapes, True)
    order = list(range(17))
    for left, right in COCO17_FLIP_PAIRS:
        order[left], order[right] = right, left
    x = plain[..., 0]
    expected_x = torch.where(x != 0, 55 - x, x)[..., order]
    torch.testing.assert_close(flipped[..., 0], expected_x, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(flipped[..., 1], plain[..., 1][..., order], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(flipped_scores, plain_scores[..., order], rtol=0, atol=0)


def test_forward_renders_the_coordinates(device):
    kp, scores, shapes = make_clips()
    module = PoseHeatmaps(limbs=COCO17_LIMBS, sigma=0.6)
    flip = torch.tensor([True, False, True, False, False], device=device)
    out = module(kp.to(device), scores.to(device), shapes.to(device), flip)
    coords, sc = module.to_heatmap_coordinates(kp.to(device), scores.to(device), shapes.to(device), flip)
    assert out.shape == (5, 34, 6, 56, 56) and out.device.type == device.type
    torch.testing.assert_close(out, render_heatmaps(coords, sc, 56, 0.6, COCO17_LIMBS), rtol=0, atol=0)
    assert out[:3].amax(dim=(1, 2, 3, 4)).min() > 0.5, "every cropped clip lands inside the heatmap"


def test_default_eps_is_the_authors_mmaction2_value(device):
    # A joint scored between mmaction2's eps (1e-4, the authors' pipeline) and pyskl's (1e-3) is drawn by default.
    kp, scores, shapes = make_clips(n=1)
    scores = torch.full_like(scores, 5e-4)
    out = PoseHeatmaps()(kp.to(device), scores.to(device), shapes[:1].to(device))
    assert 0 < out.max() <= scores.max()
    assert PoseHeatmaps(eps=1e-3)(kp.to(device), scores.to(device), shapes[:1].to(device)).max() == 0


def test_ntu25(device):
    kp, scores, shapes = make_clips(n=2, v=25)
    module = PoseHeatmaps(size=(48, 64), limbs=NTU25_BONES, flip_pairs=NTU25_FLIP_PAIRS, dtype=torch.bfloat16)
    out = module(kp.to(device), scores.to(device), shapes[:2].to(device), flip=True)
    assert out.shape == (2, 49, 6, 48, 64) and out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"flip_pairs has \(15, 16\), outside \[0, V\) for V = 15"):
        PoseHeatmaps()(kp[..., :15, :], None, (480, 640), flip=True)


def test_compile_fullgraph():
    kp, scores, shapes = make_clips()
    module = PoseHeatmaps(limbs=COCO17_LIMBS)
    flip = torch.tensor([True, False, True, False, True])
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(kp, scores, shapes, flip), module(kp, scores, shapes, flip), rtol=0, atol=0)


def test_repr_and_state():
    module = PoseHeatmaps(limbs=COCO17_LIMBS)
    for fact in ("size=(56, 56)", "sigma=0.6", "eps=0.0001", "with_joints=True", "limbs=17", "padding=0.25",
                 "threshold=10.0", "hw_ratio=1.0", "allow_imgpad=True"):
        assert fact in repr(module), repr(module)
    assert module.state_dict() == {}


@pytest.mark.parametrize("kwargs,message", [
    (dict(size=0), "size must be"), (dict(sigma=0), "sigma must be > 0"), (dict(padding=-1), "padding must be"),
    (dict(hw_ratio=0), "hw_ratio must be > 0 or None"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PoseHeatmaps(**kwargs)


def test_bad_inputs():
    kp = torch.rand(2, 1, 3, 17, 2) * 100
    with pytest.raises(ValueError, match=r"keypoints must be \(N, M, T, V, 2\)"):
        PoseHeatmaps()(kp[0], None, (480, 640))
    with pytest.raises(ValueError, match="img_shape, the \\(h, w\\) of each clip's frames, is required"):
        PoseHeatmaps()(kp)
    with pytest.raises(ValueError, match=r"img_shape must be \(h, w\) or \(N, 2\) = \(2, 2\)"):
        PoseHeatmaps()(kp, None, torch.ones(3, 2))
