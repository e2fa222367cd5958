"""Using trained models: load one from a checkpoint or run folder, make its inputs, predict, evaluate, render.

    from epamx import inference
    loaded = inference.load("runs/embedded")                 # the EPAM-Net stage's final.pt and its run's config
    clips = inference.clips(loaded.config, loaded.class_names, loaded.mode)   # the held-out split
    print(inference.predict(loaded.optimized(), loaded.config, clips, device=loaded.device)[:3])

One module per job: ``loading`` (checkpoints, configs, the inference-ready model), ``inputs`` (clips and the
device-side transform), ``evaluation`` (logits and metrics over a split), ``metrics``, ``predict``, ``render``,
``export`` (ONNX files and torch.export programs), ``onnx_model`` (an ONNX file run with ONNX Runtime).
Training (epamx.train) evaluates through this layer; the command line's eval, predict and render call it.
"""
from epamx.inference.evaluation import Evaluation, evaluate, evaluate_checkpoint, resolve_amp
from epamx.inference.export import export, export_onnx, export_program, input_contract, read_contract
from epamx.inference.inputs import build_batch_transform, clip_from_video, clips, clips_from_annotations
from epamx.inference.loading import (
                                     LoadedModel,
                                     config_for_checkpoint,
                                     inference_model,
                                     load,
                                     load_model,
                                     resolve_checkpoint,
)
from epamx.inference.onnx_model import OnnxModel, load_onnx
from epamx.inference.predict import predict
from epamx.inference.render import render_attention, render_video

__all__ = ["Evaluation", "LoadedModel", "OnnxModel", "build_batch_transform", "clip_from_video", "clips",
           "clips_from_annotations", "config_for_checkpoint", "evaluate", "evaluate_checkpoint", "export", "export_onnx",
           "export_program", "inference_model", "input_contract", "load", "load_model", "load_onnx", "predict",
           "read_contract", "render_attention", "render_video", "resolve_amp", "resolve_checkpoint"]
