"""EPAM-Net and its X-ShiftNet backbones, built on epamx.nn."""
from epamx.models.checkpoint import load_authors_checkpoint
from epamx.models.epamnet import ClassificationHead, EPAMNet
from epamx.models.xshiftnet import XShiftBlock, XShiftNet

__all__ = ["ClassificationHead", "EPAMNet", "XShiftBlock", "XShiftNet", "load_authors_checkpoint"]
