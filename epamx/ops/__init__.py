"""Fused operators. Each public op calls torch.ops.epamx.<op> and has a plain-PyTorch `<op>_reference`."""
from epamx.ops.render_heatmaps import (COCO17_FLIP_PAIRS, COCO17_LIMBS, NTU25_BONES, NTU25_FLIP_PAIRS,
                                       render_heatmaps, render_heatmaps_reference)
from epamx.ops.temporal_shift import temporal_shift, temporal_shift_, temporal_shift_reference

__all__ = ["temporal_shift", "temporal_shift_", "temporal_shift_reference",
           "render_heatmaps", "render_heatmaps_reference",
           "COCO17_LIMBS", "COCO17_FLIP_PAIRS", "NTU25_BONES", "NTU25_FLIP_PAIRS"]
