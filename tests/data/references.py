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
