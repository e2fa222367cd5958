"""The input pipeline: PoseC3D annotation pickles and RGB videos or frame folders -> batches of uint8 frames and
keypoints (workers) -> normalised frames and heatmaps (on the training device); and the embedded dataset."""
from epamx.data.annotations import (
                                    AnnotationError,
                                    UnsafePickleError,
                                    dump_annotations,
                                    load_annotations,
                                    safe_load_pickle,
)
from epamx.data.batch_transform import BatchTransform
from epamx.data.config import DataConfig, EmbeddedConfig
from epamx.data.dataset import ClipDataset, SampleError, build_dataset, build_loader, collate_clips
from epamx.data.decoding import DecodeError, read_frame_folder, read_video, write_frame_folder, write_video
from epamx.data.embedded import build_embedded
from epamx.data.pipelines import PIPELINES, Pipeline, get_pipeline
from epamx.data.sampler import ClipSampler
from epamx.data.sampling import rgb_frame_indices, uniform_sample_frames

__all__ = ["AnnotationError", "BatchTransform", "ClipDataset", "ClipSampler", "DataConfig", "DecodeError",
           "EmbeddedConfig", "PIPELINES", "Pipeline", "SampleError", "UnsafePickleError", "build_dataset", "build_embedded", "build_loader",
           "collate_clips", "dump_annotations", "get_pipeline", "load_annotations", "read_frame_folder", "read_video",
           "rgb_frame_indices", "safe_load_pickle", "uniform_sample_frames", "write_frame_folder", "write_video"]
