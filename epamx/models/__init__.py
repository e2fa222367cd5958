"""EPAM-Net, its X-ShiftNet backbones and its single-stream models, built on epamx.nn."""
from epamx.models.checkpoint import load_authors_checkpoint
from epamx.models.epamnet import ClassificationHead, EPAMNet
from epamx.models.memory_format import preferred_memory_format
from epamx.models.optimize import optimize_for_inference
from epamx.models.streams import PoseStream, RGBStream, build_model, init_from, stream_logits
from epamx.models.xshiftnet import XShiftBlock, XShiftNet

__all__ = ["ClassificationHead", "EPAMNet", "PoseStream", "RGBStream", "XShiftBlock", "XShiftNet", "build_model",
           "init_from", "load_authors_checkpoint", "optimize_for_inference", "preferred_memory_format", "stream_logits"]
