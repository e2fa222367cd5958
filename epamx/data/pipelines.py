"""The input pipelines a training stage can read its clips through, by name. Each follows one of the authors' data
preparations (github:ahmed-nady/Multimodal-Action-Recognition, dataPrep/):

- ``multimodal`` (dataPrepMultiModality.py, what EPAM-Net trains and tests with): ``clip_len`` pose frames sampled
  uniformly (MMUniformSampleFrames), the RGB frames every ``rgb_every``-th of them; the keypoints cropped to the
  persons' box over the sampled frames, clipped to the image (MMCompact, allow_imgpad=False), rescaled to the
  heatmap grid, flipped with the frames.
- ``pose_only`` (dataPrep.py, PoseC3D's X3D-shallow pipeline, what the authors' pose stream trains with):
  ``clip_len`` pose frames; PoseCompact (hw_ratio 1, allow_imgpad=True: the box may extend beyond the image) ->
  Resize (short side 64) -> RandomResizedCrop (area 0.56-1.0, aspect 3/4-4/3) -> Resize (heatmap size) -> Flip
  when training; PoseCompact (allow_imgpad=True) -> Resize (heatmap size) when testing. The random crop is
  PoseC3D's main regulariser. The keypoint geometry runs in the loader's workers
  (:func:`epamx.data.transforms.posec3d_keypoints`); the heatmaps are drawn on the device.
- ``rgb_only`` (dataPrepRGB.py, the authors' RGB stream): ``clip_len // rgb_every`` frames (16) sampled uniformly
  on their own (UniformSampleFrames), flip, normalise, no crop.

A stage names its pipeline in the config (``[stages.pose] pipeline = "pose_only"``); a pipeline must feed every
stream of the stage it is given to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

__all__ = ["PIPELINES", "Pipeline", "get_pipeline"]


@dataclass(frozen=True)
class Pipeline:
    name: str
    streams: Tuple[str, ...]         # the streams it makes inputs for
    rgb_sampling: Optional[str]      # "every": every rgb_every-th pose frame; "direct": its own clip_len // rgb_every
    pose_crop: Optional[str]         # "mmcompact": on the device, clipped to the image; "posec3d": in the workers
    source: str                      # the authors' data preparation it follows

    def check_streams(self, streams: Sequence[str]) -> Optional[str]:
        """None if this pipeline feeds every one of ``streams``, else why not."""
        missing = [s for s in streams if s not in self.streams]
        if missing:
            return (f"pipeline {self.name!r} feeds only the {' and '.join(self.streams)} stream, not "
                    f"{' and '.join(missing)}")
        return None


PIPELINES: Dict[str, Pipeline] = {
    "multimodal": Pipeline("multimodal", ("rgb", "pose"), "every", "mmcompact", "dataPrep/dataPrepMultiModality.py"),
    "pose_only": Pipeline("pose_only", ("pose",), None, "posec3d", "dataPrep/dataPrep.py (PoseC3D, X3D-shallow)"),
    "rgb_only": Pipeline("rgb_only", ("rgb",), "direct", None, "dataPrep/dataPrepRGB.py"),
}


def get_pipeline(name: str) -> Pipeline:
    """The pipeline called ``name``; ValueError naming the valid ones otherwise."""
    try:
        return PIPELINES[name]
    except KeyError:
        raise ValueError(f"no input pipeline {name!r}; the pipelines are {', '.join(PIPELINES)}") from None
