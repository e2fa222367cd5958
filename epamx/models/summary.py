"""What EPAM-Net is made of: parameters per part and multiply-adds on one clip at the paper's sizes."""
from __future__ import annotations

from typing import Dict

import torch

from epamx.models.epamnet import EPAMNet

__all__ = ["model_summary"]


def model_summary(num_classes: int = 60) -> Dict[str, str]:
    """Parameters per part and multiply-adds (torch.utils.flop_counter, which counts convolutions and matrix
    products) of EPAM-Net with ``num_classes`` classes on one clip: 16 RGB frames at 224x224 and 48 heatmap frames
    of 17 joints at 56x56. Values are formatted for printing."""
    from torch.utils.flop_counter import FlopCounterMode

    model = EPAMNet(num_classes=num_classes).eval()
    imgs, heatmaps = torch.zeros(1, 3, 16, 224, 224), torch.zeros(1, 17, 48, 56, 56)

    def gmacs(fn, *inputs) -> float:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            fn(*inputs)
        return counter.get_total_flops() / 2e9

    summary = {"RGB backbone GMACs": f"{gmacs(model.rgb_backbone, imgs):.2f}",
               "pose backbone GMACs": f"{gmacs(model.pose_backbone, heatmaps):.2f}"}
    total_macs = gmacs(model, imgs, heatmaps)
    parts = {"RGB backbone": [model.rgb_backbone], "pose backbone": [model.pose_backbone],
             "attention": [model.attention_module], "heads": [model.rgb_cls_head, model.pose_cls_head]}
    for name, modules in parts.items():
        summary[f"{name} parameters"] = f"{sum(p.numel() for m in modules for p in m.parameters()):,}"
    summary["total parameters"] = f"{sum(p.numel() for p in model.parameters()):,} ({num_classes} classes)"
    summary["total GMACs"] = f"{total_macs:.2f} (convolutions and matrix products; the paper's 8.1 GFLOPs also " \
                             "counts batch norm, activations and pooling)"
    return summary
