"""Data pipeline helpers: frame sampling for the pose and RGB streams."""
from epamx.data.sampling import rgb_frame_indices, uniform_sample_frames

__all__ = ["uniform_sample_frames", "rgb_frame_indices"]
