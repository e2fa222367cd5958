from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from epamx.ops import COCO17_FLIP_PAIRS, render_heatmaps

ImageShape = Union[Tensor, Sequence[float]]
# flip_rule -> the width a flipped x is subtracted from, given the heatmap width W
FLIP_RULES = {"mirror": lambda width: width - 1, "authors": lambda width: width}


class PoseHeatmaps(nn.Module):
    """EPAM-Net's pose input, batched on the keypoints' device: raw keypoints in image coordinates -> pseudo-heatmap
    volumes (N, C, T, H, W), as PoseC3D's PoseCompact -> Resize -> Flip -> GeneratePoseTarget pipeline does per
    sample in NumPy.

    1. Crop to the persons' box (pyskl ``PoseCompact(padding, threshold, hw_ratio, allow_imgpad)``): the tight box
       of every valid coordinate of the clip (all persons, all frames), unless it is narrower or shorter than
       ``threshold`` pixels (then the whole image is kept); expanded about its centre by ``1 + padding``; made
       square (``hw_ratio=1``) by growing the shorter side; corners truncated toward zero with ``int()``;
       with ``allow_imgpad=False`` clipped to the image first. The arithmetic follows NumPy 1.x on float32
       keypoints (the sum and difference of the extremes in float32, the rest in float64).
    2. Rescale the box to ``size`` (pyskl ``Resize(keep_ratio=False)``): x * float32(W / box width), likewise y.
    3. Optionally flip horizontally: x -> (W - 1) - x in heatmap pixels (``flip_rule="mirror"``), and swap the
       left/right joints of ``flip_pairs``. This mirrors pixel centres, like flipping the frames (``img[:, ::-1]``)
       and like ``GeneratePoseTarget(double=True)``'s heatmap flip; pyskl's keypoint ``Flip``, which the authors
       trained with, uses W - x instead (``flip_rule="authors"``), one pixel off from both of those. (A rendered
       flip still differs from a flipped render at window edges, because the 3-sigma window is asymmetric.)
    4. Render with :func:`epamx.ops.render_heatmaps`.

    Coordinates equal to 0 mean "missing" in PoseC3D annotations: as in pyskl, they are left out of the box and
    are not shifted, rescaled into the box or flipped (they stay 0, and are drawn at 0 if their score is at least
    ``eps``). Unlike pyskl, which turns NaN into 0, NaN and infinite coordinates stay as they are: left out of the
    box and not drawn.

    Args:
        size: output (H, W), or one int (56 in EPAM-Net).
        sigma, limbs, with_joints, eps, dtype: as in :func:`epamx.ops.render_heatmaps` (limbs: (start, end)
            joint pairs, e.g. ``epamx.ops.COCO17_LIMBS``; None for joints only, the paper's default; eps 1e-4 as
            the authors' mmaction2 pipeline, 1e-3 to match pyskl's).
        padding: the box grows by this fraction of its width and height (0.25).
        threshold: boxes narrower or shorter than this many pixels are not cropped (10, as pyskl).
        hw_ratio: the box's height/width ratio (1.0: square), or None to keep the persons' aspect ratio.
        allow_imgpad: let the box extend beyond the image (True) or clip it to the image first (False, what the
            authors' multimodal pipeline's MMCompact uses).
        flip_pairs: (left, right) joint index pairs swapped by a flip (COCO-17's by default,
            ``epamx.ops.NTU25_FLIP_PAIRS`` for NTU's 25 joints).
        crop: False skips step 1: the keypoints are already cropped (the pose-only pipeline crops them in the
            loader's workers, epamx.data.transforms.posec3d_keypoints) and are only rescaled from img_shape.
        flip_rule: "mirror" (x -> (W - 1) - x) or "authors" (x -> W - x), see step 3.
    """

    def __init__(self, size: Union[int, Tuple[int, int]] = 56, sigma: float = 0.6,
                 limbs: Optional[Sequence[Tuple[int, int]]] = None, with_joints: bool = True, eps: float = 1e-4,
                 padding: float = 0.25, threshold: float = 10.0, hw_ratio: Optional[float] = 1.0,
                 allow_imgpad: bool = True, flip_pairs: Sequence[Tuple[int, int]] = COCO17_FLIP_PAIRS,
                 dtype: Optional[torch.dtype] = None, crop: bool = True, flip_rule: str = "mirror"):
        super().__init__()
        self.size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"PoseHeatmaps: size must be an int or (H, W), both >= 1, got {size!r}")
        if not sigma > 0:
            raise ValueError(f"PoseHeatmaps: sigma must be > 0, got {sigma!r}")
        if not padding >= 0:
            raise ValueError(f"PoseHeatmaps: padding must be >= 0, got {padding!r}")
        if hw_ratio is not None and not hw_ratio > 0:
            raise ValueError(f"PoseHeatmaps: hw_ratio must be > 0 or None, got {hw_ratio!r}")
        if flip_rule not in FLIP_RULES:
            raise ValueError(f"PoseHeatmaps: flip_rule must be one of {', '.join(FLIP_RULES)}, got {flip_rule!r}")
        self.crop = bool(crop)
        self.flip_rule = flip_rule
        self.sigma = float(sigma)
        self.limbs = tuple((int(a), int(b)) for a, b in limbs) if limbs is not None else None
        self.with_joints = with_joints
        self.eps = float(eps)
        self.padding = float(padding)
        self.threshold = float(threshold)
        self.hw_ratio = None if hw_ratio is None else float(hw_ratio)
        self.allow_imgpad = allow_imgpad
        self.flip_pairs = tuple((int(a), int(b)) for a, b in flip_pairs)
        self.dtype = dtype

    def forward(self, keypoints: Tensor, scores: Optional[Tensor] = None, img_shape: Optional[ImageShape] = None,
                flip: Union[bool, Tensor, None] = None) -> Tensor:
        """keypoints (N, M, T, V, 2) in image pixels, scores (N, M, T, V) or None, img_shape (N, 2) or one (h, w)
        for all clips, flip a bool or an (N,) bool tensor -> heatmaps (N, C, T, H, W)."""
        kp, scores = self.to_heatmap_coordinates(keypoints, scores, img_shape, flip)
        return render_heatmaps(kp, scores, self.size, self.sigma, self.limbs, self.with_joints, self.eps,
                               self.dtype)

    def to_heatmap_coordinates(self, keypoints: Tensor, scores: Optional[Tensor] = None,
                               img_shape: Optional[ImageShape] = None,
                               flip: Union[bool, Tensor, None] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """Steps 1-3: keypoints (N, M, T, V, 2) in image pixels -> float32 keypoints in heatmap pixels, and the
        scores with the same joint order (flipped clips swap left and right)."""
        if keypoints.dim() != 5 or keypoints.shape[-1] != 2:
            raise ValueError(f"PoseHeatmaps: keypoints must be (N, M, T, V, 2), got shape {tuple(keypoints.shape)}")
        if img_shape is None:
            raise ValueError("PoseHeatmaps: img_shape, the (h, w) of each clip's frames, is required")
        n = keypoints.shape[0]
        device = keypoints.device
        shape = torch.as_tensor(img_shape, dtype=torch.float64, device=device)
        if shape.shape not in ((2,), (n, 2)):
            raise ValueError(f"PoseHeatmaps: img_shape must be (h, w) or (N, 2) = ({n}, 2), got shape "
                             f"{tuple(shape.shape)}")
        img_h, img_w = shape.expand(n, 2).unbind(-1)

        kp = keypoints.to(torch.float32)
        x, y = kp[..., 0], kp[..., 1]
        valid_x = torch.isfinite(x) & (x != 0)
        valid_y = torch.isfinite(y) & (y != 0)
        x0, y0, x1, y1 = self._boxes(x, y, valid_x, valid_y, img_h, img_w)
        out_h, out_w = self.size
        # float32 scale factors and products, as pyskl's Resize; "missing" zeros are neither shifted nor moved.
        scale_x = (out_w / (x1 - x0)).to(torch.float32).view(n, 1, 1, 1)
        scale_y = (out_h / (y1 - y0)).to(torch.float32).view(n, 1, 1, 1)
        x = torch.where(x != 0, x - x0.to(torch.float32).view(n, 1, 1, 1), x) * scale_x
        y = torch.where(y != 0, y - y0.to(torch.float32).view(n, 1, 1, 1), y) * scale_y
        if flip is not None and flip is not False:
            flip = torch.as_tensor(flip, dtype=torch.bool, device=device).expand(n).view(n, 1, 1, 1)
            x = torch.where(flip & (x != 0), FLIP_RULES[self.flip_rule](out_w) - x, x)
            order = self._flip_order(kp.shape[3], device)
            x = torch.where(flip, x[..., order], x)
            y = torch.where(flip, y[..., order], y)
            if scores is not None:
                scores = torch.where(flip, scores[..., order], scores)
        return torch.stack([x, y], dim=-1), scores

    def _boxes(self, x, y, valid_x, valid_y, img_h, img_w):
        """Each clip's crop box (x0, y0, x1, y1), float64 holding integers, as pyskl's PoseCompact computes it."""
        inf = torch.tensor(float("inf"), dtype=torch.float32, device=x.device)
        min_x = torch.where(valid_x, x, inf).flatten(1).amin(1)
        max_x = torch.where(valid_x, x, -inf).flatten(1).amax(1)
        min_y = torch.where(valid_y, y, inf).flatten(1).amin(1)
        max_y = torch.where(valid_y, y, -inf).flatten(1).amax(1)
        compact = (max_x - min_x >= self.threshold) & (max_y - min_y >= self.threshold) & self.crop
        # NumPy 1.x: float32 scalar + float32 scalar stays float32; dividing by the Python int 2 goes to float64.
        center_x = (max_x + min_x).double() / 2
        center_y = (max_y + min_y).double() / 2
        half_w = (max_x - min_x).double() / 2 * (1 + self.padding)
        half_h = (max_y - min_y).double() / 2 * (1 + self.padding)
        if self.hw_ratio is not None:
            half_h = torch.maximum(self.hw_ratio * half_w, half_h)
            half_w = torch.maximum(1 / self.hw_ratio * half_h, half_w)
        x0, x1 = center_x - half_w, center_x + half_w
        y0, y1 = center_y - half_h, center_y + half_h
        if not self.allow_imgpad:
            x0, y0 = x0.clamp(min=0), y0.clamp(min=0)
            x1, y1 = torch.minimum(x1, img_w), torch.minimum(y1, img_h)
        box = [v.trunc() for v in (x0, y0, x1, y1)]
        whole_image = [torch.zeros_like(img_w), torch.zeros_like(img_h), img_w, img_h]
        # Boxes of clips left uncropped may be inf or NaN: selected away here.
        return [torch.where(compact, b, whole) for b, whole in zip(box, whole_image)]

    def _flip_order(self, num_joints: int, device: torch.device) -> Tensor:
        order = list(range(num_joints))
        for left, right in self.flip_pairs:
            if not (0 <= left < num_joints and 0 <= right < num_joints):
                raise ValueError(f"PoseHeatmaps: flip_pairs has ({left}, {right}), outside [0, V) for V = "
                                 f"{num_joints}; pass the pairs of your skeleton (e.g. epamx.ops.NTU25_FLIP_PAIRS)")
            order[left], order[right] = right, left
        return torch.tensor(order, device=device)

    def extra_repr(self) -> str:
        text = f"size={self.size}, sigma={self.sigma}, eps={self.eps}, with_joints={self.with_joints}"
        if self.limbs is not None:
            text += f", limbs={len(self.limbs)}"
        if self.crop:
            text += (f", padding={self.padding}, threshold={self.threshold}, hw_ratio={self.hw_ratio}, "
                     f"allow_imgpad={self.allow_imgpad}")
        else:
            text += ", crop=False"
        if self.flip_rule != "mirror":
            text += f", flip_rule={self.flip_rule!r}"
        if self.dtype is not None:
            text += f", dtype={self.dtype}"
        return text
