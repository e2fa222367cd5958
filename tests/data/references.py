"""NumPy references for the data-layer tests, written from the authors' pipeline (their mmaction2-based code)."""
import numpy as np


def mmcompact_box(keypoint, img_shape, padding=0.25, threshold=10, hw_ratio=1.0):
    """The authors' MMCompact.get_box (data_preparation/crop_RGBFrames_PKU.py, allow_imgpad=False), evaluated as
    NumPy 1.x did: the extremes are float32 array scalars, their sums and differences stay float32, and the first
    operation with a Python number (/ 2) goes to float64."""
    h, w = img_shape
    kp = np.array(keypoint, dtype=np.float32)
    kp[np.isnan(kp)] = 0.0
    kp_x, kp_y = kp[..., 0], kp[..., 1]
    min_x = np.min(kp_x[kp_x != 0], initial=np.inf)
    min_y = np.min(kp_y[kp_y != 0], initial=np.inf)
    max_x = np.max(kp_x[kp_x != 0], initial=-np.inf)
    max_y = np.max(kp_y[kp_y != 0], initial=-np.inf)
    if max_x - min_x < threshold or max_y - min_y < threshold:
        return 0, 0, w, h
    center = (np.float64(max_x + min_x) / 2, np.float64(max_y + min_y) / 2)
    half_width = np.float64(max_x - min_x) / 2 * (1 + padding)
    half_height = np.float64(max_y - min_y) / 2 * (1 + padding)
    half_height = max(hw_ratio * half_width, half_height)
    half_width = max(1 / hw_ratio * half_height, half_width)
    min_x, max_x = center[0] - half_width, center[0] + half_width
    min_y, max_y = center[1] - half_height, center[1] + half_height
    return int(max(0, min_x)), int(max(0, min_y)), int(min(w, max_x)), int(min(h, max_y))


def pil_crop_resize(frames, box, size):
    """Each frame's box (clipped to the frame; an empty box means the whole frame) resized to (size, size) with
    PIL's bilinear filter, what epamx uses. (The authors' preparation used cv2.resize, whose bilinear filter does not
    widen when shrinking, so their frames are a little sharper and more aliased.)"""
    from PIL import Image

    h, w = frames.shape[1:3]
    x0, y0, x1, y1 = max(0, box[0]), max(0, box[1]), min(w, box[2]), min(h, box[3])
    if x1 <= x0 or y1 <= y0:
        x0, y0, x1, y1 = 0, 0, w, h
    return np.stack([np.asarray(Image.fromarray(f).crop((x0, y0, x1, y1)).resize((size, size), Image.BILINEAR))
                     for f in frames])


def pyskl_pose_only_keypoints(keypoint, img_shape, size, rng=None, short_side=64, area_range=(0.56, 1.0)):
    """The authors' pose-only keypoint chain (dataPrep/dataPrep.py, pyskl's transforms), step by step:
    PoseCompact(hw_ratio=1, allow_imgpad=True) -> [Resize(scale=(-1, short_side)) -> RandomResizedCrop(area_range)]
    when ``rng`` is given -> Resize((size, size), keep_ratio=False). The random draws come from ``rng`` in
    mmaction2's order (10 log-uniform aspect ratios, 10 areas, then the x and y offsets), where pyskl draws from
    NumPy's and Python's global generators. Returns keypoints whose missing (0) entries went wherever pyskl moves
    them; compare only the present ones."""
    h, w = img_shape
    kp = np.array(keypoint, dtype=np.float32)
    kp[np.isnan(kp)] = 0.0
    kp_x, kp_y = kp[..., 0], kp[..., 1]
    min_x = np.min(kp_x[kp_x != 0], initial=np.inf)
    min_y = np.min(kp_y[kp_y != 0], initial=np.inf)
    max_x = np.max(kp_x[kp_x != 0], initial=-np.inf)
    max_y = np.max(kp_y[kp_y != 0], initial=-np.inf)
    if not (max_x - min_x < 10 or max_y - min_y < 10):
        center = (np.float64(max_x + min_x) / 2, np.float64(max_y + min_y) / 2)
        half_w = np.float64(max_x - min_x) / 2 * 1.25
        half_h = np.float64(max_y - min_y) / 2 * 1.25
        half_h = max(half_w, half_h)
        half_w = max(half_h, half_w)
        x0, x1 = int(center[0] - half_w), int(center[0] + half_w)
        y0, y1 = int(center[1] - half_h), int(center[1] + half_h)
        kp_x[kp_x != 0] -= x0
        kp_y[kp_y != 0] -= y0
        h, w = y1 - y0, x1 - x0
    if rng is not None:
        # Resize(scale=(-1, 64)): mmcv.rescale_size with the short edge at 64
        factor = min(float(np.inf) / max(h, w), short_side / min(h, w))
        new_w, new_h = int(w * factor + 0.5), int(h * factor + 0.5)
        kp = kp * np.array([new_w / w, new_h / h], dtype=np.float32)
        h, w = new_h, new_w
        ratios = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), size=10))
        areas = rng.uniform(*area_range, size=10) * h * w
        crop_ws = np.round(np.sqrt(areas * ratios)).astype(np.int32)
        crop_hs = np.round(np.sqrt(areas / ratios)).astype(np.int32)
        for crop_w, crop_h in zip(crop_ws, crop_hs):
            if crop_h <= h and crop_w <= w:
                x_off = rng.randint(0, w - crop_w + 1)
                y_off = rng.randint(0, h - crop_h + 1)
                break
        else:
            crop_w = crop_h = min(h, w)
            x_off, y_off = (w - crop_w) // 2, (h - crop_h) // 2
        kp = kp - np.array([x_off, y_off])
        h, w = int(crop_h), int(crop_w)
    return kp * np.array([size / w, size / h], dtype=np.float32)
