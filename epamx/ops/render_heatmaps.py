"""Pose pseudo-heatmaps (PoseC3D's GeneratePoseTarget) rendered from keypoints in one fused op.

For clip n, channel c, frame t and pixel (x, y) of an (H, W) heatmap (pixel x has coordinate x):

- joint channel k (k < V, when ``with_joints``): the max over persons m of
  ``score[m, k] * exp(-((x - kx)^2 + (y - ky)^2) / (2 sigma^2))``, where (kx, ky) is joint k of person m;
- limb channel (V + l, or l without joints) for the pair (a, b): the max over persons of
  ``min(score_a, score_b) * exp(-d2 / (2 sigma^2))`` with d2 the squared distance from the pixel to the segment
  a-b (to the nearer end point beyond the ends); a limb shorter than 1 pixel (squared length < 1) is drawn as
  joint a's Gaussian with score_a as its peak;
- 0 where no person draws.

A person draws only inside its window: along x, ``[max(int(lo - 3 sigma), 0), min(int(hi + 3 sigma) + 1, W))``
with lo = hi = the joint's x, or the smaller and larger x of a limb's end points (the same along y); ``int``
truncates toward zero, so a joint slightly left of the image still reaches column 0. Persons whose score is
below ``eps`` (for a limb: min(score_a, score_b) < eps) draw nothing.

``eps`` defaults to 1e-4, the value of mmaction2's ``GeneratePoseTarget``, which EPAM-Net's authors render with
(so a checkpoint of theirs sees the heatmaps it was trained on). pyskl's copy of the transform uses 1e-3: pass
``eps=1e-3`` to reproduce pyskl's heatmaps (joints scored in [1e-4, 1e-3) then draw nothing).

Where epamx deliberately differs from the NumPy original (pyskl / mmaction2 ``GeneratePoseTarget``), and why:

- NaN or infinite coordinates mean "missing": that joint (and every limb using it) draws nothing. The original
  raises in ``int(nan)``, so data loaders must clean keypoints first; a fused op on the device cannot raise per
  element, and missing joints are common in detector output.
- Any non-finite score (NaN, inf or -inf) means "missing" too: that joint draws nothing, and neither does a limb
  with a non-finite score at either end. The original's ``score < eps`` is False for NaN, so it writes NaN into
  the window (or for a limb ignores a NaN end score in ``min``), and an infinite score draws infinite pixels,
  with NaN where the Gaussian underflows to 0.
- Joints and limbs can be rendered together (channels V..V+L-1 after the V joint channels); pyskl allows only
  one of the two, and mmaction2's version concatenates them in this same order.
- Scalar arithmetic follows NumPy 1.x (the authors' environment), which promoted a float32 scalar combined
  with a Python number to float64: window bounds come from ``float64(x) - 3 * sigma`` and a limb's squared
  length from float64 sums of its float32 differences. NumPy >= 2 keeps such scalars in float32, which can
  move a window bound by one pixel when ``x -/+ 3 sigma`` lies within float32 rounding of an integer, and
  changes a limb's squared length by an ulp.
- Everything else (the Gaussian and segment-distance arithmetic, in float32, in the original's order of
  operations) is the original's, except ``exp`` itself: a polynomial shared by the CPU and CUDA kernels, within
  1.22 ulp of exp, and 0 below exp(-87) = 1.7e-38 (where float32 nears its subnormals). The CPU kernel agrees
  with this module's NumPy renderer to 1.2e-7 (measured on random inputs).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "render_heatmaps",
    "render_heatmaps_reference",
    "COCO17_LIMBS",
    "COCO17_FLIP_PAIRS",
    "NTU25_BONES",
    "NTU25_FLIP_PAIRS",
]

# COCO-17 keypoints: 0 nose, 1/2 eyes, 3/4 ears, 5/6 shoulders, 7/8 elbows, 9/10 wrists, 11/12 hips, 13/14 knees,
# 15/16 ankles (left, right). The 17 limbs of pyskl's and mmaction2's GeneratePoseTarget, in their order.
COCO17_LIMBS = ((0, 1), (0, 2), (1, 3), (2, 4), (0, 5), (5, 7), (7, 9), (0, 6), (6, 8), (8, 10), (5, 11),
                (11, 13), (13, 15), (6, 12), (12, 14), (14, 16), (11, 12))
COCO17_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
# NTU RGB+D's 25 Kinect v2 joints (0-based): the 24 bones of the NTU skeleton graph (child, parent), and its
# left/right joint pairs (shoulder, elbow, wrist, hand, hip, knee, ankle, foot, hand tip, thumb).
NTU25_BONES = ((0, 1), (1, 20), (2, 20), (3, 2), (4, 20), (5, 4), (6, 5), (7, 6), (8, 20), (9, 8), (10, 9),
               (11, 10), (12, 0), (13, 12), (14, 13), (15, 14), (16, 0), (17, 16), (18, 17), (19, 18), (21, 22),
               (22, 7), (23, 24), (24, 11))
NTU25_FLIP_PAIRS = ((4, 8), (5, 9), (6, 10), (7, 11), (12, 16), (13, 17), (14, 18), (15, 19), (21, 23), (22, 24))

Limbs = Union[Sequence[Sequence[int]], Tensor, None]


def _flat_limbs(limbs: Limbs) -> Optional[list[int]]:
    if limbs is None:
        return None
    if isinstance(limbs, Tensor):
        if limbs.dim() != 2 or limbs.shape[1] != 2 or limbs.is_floating_point() or limbs.is_complex():
            raise ValueError(f"render_heatmaps: limbs must be an integer (L, 2) tensor of joint pairs, got "
                             f"{limbs.dtype} of shape {tuple(limbs.shape)}")
        return [int(v) for v in limbs.reshape(-1).tolist()]
    flat = []
    for pair in limbs:
        if len(pair) != 2:
            raise ValueError(f"render_heatmaps: limbs must be (start, end) joint pairs, got {pair!r}")
        flat.extend(int(v) for v in pair)
    return flat


def _size(size: Union[int, Sequence[int]]) -> list[int]:
    return [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]


def render_heatmaps(keypoints: Tensor, scores: Optional[Tensor] = None, size: Union[int, Sequence[int]] = (56, 56),
                    sigma: float = 0.6, limbs: Limbs = None, with_joints: bool = True, eps: float = 1e-4,
                    dtype: Optional[torch.dtype] = None) -> Tensor:
    """Render PoseC3D pseudo-heatmaps for a batch of clips in one kernel (see the module docstring).

    Args:
        keypoints: (N, M, T, V, 2) (x, y) in heatmap pixels, N clips of M persons, T frames, V joints; any
            floating dtype (computed in float32). NaN or infinite coordinates mark missing joints.
        scores: (N, M, T, V) keypoint confidences, the Gaussians' peaks; None means all ones. NaN and infinite
            scores mark missing joints.
        size: (H, W) of the heatmaps, or one int for square ones.
        sigma: the Gaussian's standard deviation in pixels (> 0).
        limbs: (start, end) joint pairs, a sequence or an (L, 2) integer tensor (a CUDA tensor is read back to the
            host), rendered as channels after the joints; None for none. COCO-17's are ``COCO17_LIMBS``.
        with_joints: render the V joint channels.
        eps: persons (limbs) with a score (min of both end scores) below eps draw nothing. 1e-4 as in mmaction2,
            which EPAM-Net's authors use; pyskl uses 1e-3.
        dtype: float32 (default), float64, float16 or bfloat16 output; values are computed in float32.

    Returns:
        (N, C, T, H, W) with C = (V if with_joints else 0) + L. Not differentiable: a backward pass through it
        raises (heatmaps are rendered from keypoints as data, as in PoseC3D); so does torch.compile, when it
        compiles a graph in which keypoints or scores require grad (AOTAutograd traces the backward up front).
    """
    return torch.ops.epamx.render_heatmaps(keypoints, scores, _size(size), float(sigma), _flat_limbs(limbs),
                                           with_joints, float(eps), dtype)


# ---- the reference: the original's per-sample NumPy loop, written from the definition above ---------------------

def _window(lo: float, hi: float, sigma: float, size: int) -> tuple[int, int]:
    # Python floats (float64) and int() truncation toward zero, as the original evaluates them under NumPy 1.x.
    return max(int(lo - 3 * sigma), 0), min(int(hi + 3 * sigma) + 1, size)


def _score_draws(score, eps: float) -> bool:
    # Compared as a Python float, as NumPy 1.x compared a float32 scalar with the Python float eps.
    return math.isfinite(score) and float(score) >= eps


def _draw_joint(arr, x, y, score, sigma, eps):
    import numpy as np

    if not _score_draws(score, eps) or not (math.isfinite(x) and math.isfinite(y)):
        return
    h, w = arr.shape
    x0, x1 = _window(float(x), float(x), sigma, w)
    y0, y1 = _window(float(y), float(y), sigma, h)
    if x0 >= x1 or y0 >= y1:
        return
    xs = np.arange(x0, x1, dtype=np.float32)
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]
    patch = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / 2 / np.float32(sigma ** 2)) * score
    np.maximum(arr[y0:y1, x0:x1], patch, out=arr[y0:y1, x0:x1])


def _draw_limb(arr, a, b, score_a, score_b, sigma, eps):
    import numpy as np

    if not (_score_draws(score_a, eps) and _score_draws(score_b, eps)):
        return
    if not all(math.isfinite(v) for v in (a[0], a[1], b[0], b[1])):
        return
    peak = np.minimum(score_a, score_b)
    # A Python float from the float32 differences, as NumPy 1.x promoted the original's scalar arithmetic.
    d2_ab = float(a[0] - b[0]) ** 2 + float(a[1] - b[1]) ** 2
    if d2_ab < 1:
        _draw_joint(arr, a[0], a[1], score_a, sigma, eps)
        return
    h, w = arr.shape
    x0, x1 = _window(float(min(a[0], b[0])), float(max(a[0], b[0])), sigma, w)
    y0, y1 = _window(float(min(a[1], b[1])), float(max(a[1], b[1])), sigma, h)
    if x0 >= x1 or y0 >= y1:
        return
    xs = np.arange(x0, x1, dtype=np.float32)
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]
    d2_a = (xs - a[0]) ** 2 + (ys - a[1]) ** 2
    d2_b = (xs - b[0]) ** 2 + (ys - b[1]) ** 2
    d2_ab = np.float32(d2_ab)
    coeff = (d2_a - d2_b + d2_ab) / 2 / d2_ab
    d2_line = (xs - (a[0] + coeff * (b[0] - a[0]))) ** 2 + (ys - (a[1] + coeff * (b[1] - a[1]))) ** 2
    d2 = np.where(coeff <= 0, d2_a, np.where(coeff >= 1, d2_b, d2_line))
    patch = np.exp(-d2 / 2 / np.float32(sigma ** 2)) * peak
    np.maximum(arr[y0:y1, x0:x1], patch, out=arr[y0:y1, x0:x1])


def _render_clip_numpy(kps, scores, h, w, sigma, limbs, with_joints, eps):
    """One clip, as the original renders it: kps (M, T, V, 2) and scores (M, T, V) float32 -> (T, C, H, W)."""
    import numpy as np

    num_persons, num_frames, num_joints, _ = kps.shape
    channels = (num_joints if with_joints else 0) + len(limbs)
    out = np.zeros((num_frames, channels, h, w), dtype=np.float32)
    for t in range(num_frames):
        for m in range(num_persons):
            if with_joints:
                for k in range(num_joints):
                    _draw_joint(out[t, k], kps[m, t, k, 0], kps[m, t, k, 1], scores[m, t, k], sigma, eps)
            base = num_joints if with_joints else 0
            for i, (a, b) in enumerate(limbs):
                _draw_limb(out[t, base + i], kps[m, t, a], kps[m, t, b], scores[m, t, a], scores[m, t, b], sigma, eps)
    return out


def render_heatmaps_reference(keypoints: Tensor, scores: Optional[Tensor] = None,
                              size: Union[int, Sequence[int]] = (56, 56), sigma: float = 0.6, limbs: Limbs = None,
                              with_joints: bool = True, eps: float = 1e-4,
                              dtype: Optional[torch.dtype] = None) -> Tensor:
    """:func:`render_heatmaps` the way PoseC3D's data pipeline does it: NumPy, one clip, frame, person and
    channel at a time, drawing each Gaussian into its window with ``np.maximum``; the clips' (T, C, H, W)
    arrays are then stacked and transposed to (N, C, T, H, W). Follows epamx's documented choices where they
    differ from the original (missing joints, non-finite scores), so it is comparable on every input.

    The baseline the benchmarks measure, and a reference the tests check the op against.
    """
    import numpy as np

    h, w = _size(size)
    flat = _flat_limbs(limbs) or []
    pairs = list(zip(flat[0::2], flat[1::2]))
    kps = keypoints.detach().to("cpu", torch.float32).numpy()
    if scores is None:
        conf = np.ones(kps.shape[:-1], dtype=np.float32)
    else:
        conf = scores.detach().to("cpu", torch.float32).numpy()
    clips = [_render_clip_numpy(kps[n], conf[n], h, w, float(sigma), pairs, with_joints, float(eps))
             for n in range(kps.shape[0])]
    channels = (kps.shape[3] if with_joints else 0) + len(pairs)
    volume = np.stack(clips) if clips else np.zeros((0, kps.shape[2], channels, h, w), dtype=np.float32)
    out = torch.from_numpy(volume).transpose(1, 2).contiguous()
    return out.to(device=keypoints.device, dtype=dtype or torch.float32)


# ---- registrations: fake kernel (shapes for torch.compile / meta tensors) and autograd --------------------------

@torch.library.register_fake("epamx::render_heatmaps")
def _render_heatmaps_fake(keypoints, scores, size, sigma=0.6, limbs=None, with_joints=True, eps=1e-4, dtype=None):
    torch._check(keypoints.dim() == 5 and keypoints.shape[4] == 2,
                 lambda: f"render_heatmaps: keypoints must be 5-D (N, M, T, V, 2), got {tuple(keypoints.shape)}")
    torch._check(scores is None or scores.device == keypoints.device,
                 lambda: f"render_heatmaps: keypoints and scores must be on the same device, got {keypoints.device} "
                         f"and {scores.device}")
    n, _, t, v, _ = keypoints.shape
    channels = (v if with_joints else 0) + (len(limbs) // 2 if limbs else 0)
    return keypoints.new_empty((n, channels, t, size[0], size[1]), dtype=dtype or torch.float32)


def _setup_context(ctx, inputs, output):
    pass


def _no_gradient(ctx, grad):
    raise RuntimeError(
        "epamx.ops.render_heatmaps has no gradient with respect to keypoints or scores: heatmaps are rendered "
        "from keypoints as input data (as in PoseC3D). Pass keypoints.detach() (and scores.detach()).")


torch.library.register_autograd("epamx::render_heatmaps", _no_gradient, setup_context=_setup_context)
