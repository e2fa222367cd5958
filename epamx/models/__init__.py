"""EPAM-Net, its X-ShiftNet backbones and its single-stream models, built on epamx.nn."""
from epamx.models.checkpoint import Checkpoint, load_authors_checkpoint, read_checkpoint
from epamx.models.epamnet import ClassificationHead, EPAMNet
from epamx.models.memory_format import preferred_memory_format
from epamx.models.optimize import INFERENCE_DTYPES, cpu_has_bf16, optimize_for_inference
from epamx.models.streams import MODES, PoseStream, RGBStream, build_model, init_from, model_mode, stream_logits
from epamx.models.summary import model_summary
from epamx.models.xshiftnet import XShiftBlock, XShiftNet

__all__ = ["INFERENCE_DTYPES", "MODES", "Checkpoint", "ClassificationHead", "EPAMNet", "PoseStream", "RGBStream", "XShiftBlock",
           "XShiftNet", "build_model", "cpu_has_bf16", "init_from", "load_authors_checkpoint", "model_mode", "model_summary",
           "optimize_for_inference", "preferred_memory_format", "read_checkpoint", "stream_logits"]
