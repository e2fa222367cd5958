"""The input pipeline: loader throughput on a small embedded dataset (24 clips of 48 frames at 64x64, clip_len 48,
16 RGB frames; videos vs JPEG folders; 0, 1 and 2 worker processes), and the heatmap step: BatchTransform (crop,
rescale, flip and render, batched on the device) against the same heatmaps made per clip in NumPy as the authors'
pipeline does (MMCompact -> Resize -> Flip -> GeneratePoseTarget, epamx.ops.render_heatmaps_reference).

Loader rows time one epoch (batch 4, persistent workers, so worker start-up is not counted), all six loaders one
case, interleaved; the ratios to the single-process loader and of frames to video are extra ratios, and clips/s
are listed under the table. On a CPU that other processes keep busy, every 2-thread OpenMP region waits for its
second thread to be scheduled (torch.stack of a batch's frames took 20 ms instead of 0.04 ms on the shared 2-core
machines), which the single-process loader pays in collate and workers (1 thread each) do not; --bench-threads 1
shows the difference."""
import numpy as np
import pytest
import torch

from epamx.data import BatchTransform, DataConfig, EmbeddedConfig, build_dataset, build_embedded, build_loader
from epamx.data.transforms import compact_box
from epamx.ops import COCO17_FLIP_PAIRS, render_heatmaps_reference

CLIPS_PER_CLASS = 2


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("epamx-cache")


def _config(cache, fmt):
    return DataConfig(cache_dir=str(cache), frame_size=64, heatmap_size=16, embedded=EmbeddedConfig(
        train_per_class=CLIPS_PER_CLASS, val_per_class=1, frames=48, image_size=64, format=fmt))


FORMATS = ("video", "frames")
WORKERS = (0, 1, 2)


def test_loader_throughput(compare, record_metric, embedded_cache):
    """One case: every format and worker count, interleaved epoch by epoch (idle persistent workers wait)."""
    impls = {}
    for fmt in FORMATS:
        cfg = _config(embedded_cache, fmt)
        build_embedded(cfg, progress=False)
        dataset = build_dataset(cfg, "train", train=True, progress=False)
        for workers in WORKERS:
            loader = build_loader(dataset, batch_size=4, train=True, seed=0, workers=workers)
            impls[f"{fmt}, {workers} workers"] = _epoch(loader)
    clips = len(dataset)
    for name, one_epoch in impls.items():
        assert one_epoch() == clips, name  # starts the workers
    extra = [(f"{fmt}, {w} workers", f"{fmt}, 0 workers") for fmt in FORMATS for w in WORKERS if w] + \
        [(f"frames, {w} workers", f"video, {w} workers") for w in WORKERS]
    result = compare("loader epoch", f"{clips} clips of 48 frames 64x64, batch 4", impls, device="cpu",
                     baseline="video, 0 workers", ratios=extra)
    for fmt in FORMATS:
        for workers in WORKERS:
            name = f"{fmt}, {workers} workers"
            versus = f" ({result.ratio(name, f'{fmt}, 0 workers').median:.2f}x 0 workers)" if workers else ""
            record_metric("loader clips/s", name, f"{clips / result.seconds(name):.1f}{versus}")
    for workers in WORKERS:
        record_metric("loader frames vs video", f"{workers} workers",
                      f"{result.ratio(f'frames, {workers} workers', f'video, {workers} workers').median:.2f}x")


def _epoch(loader):
    epoch = iter(range(1_000_000))

    def one_epoch():
        loader.sampler.set_epoch(next(epoch))
        return sum(len(batch["label"]) for batch in loader)
    return one_epoch


def poses(clips, persons=2, frames=48, seed=0):
    """Persons of varying size somewhere in 1080p frames, jittered per frame; a few joints missing."""
    g = np.random.RandomState(seed)
    centre = g.uniform(0.3, 0.7, size=(clips, 1, 1, 1, 2)) * (1920, 1080)
    extent = g.uniform(150, 500, size=(clips, persons, 1, 1, 2))
    kp = (centre + (g.rand(clips, persons, frames, 17, 2) - 0.5) * extent).astype(np.float32)
    kp[g.rand(*kp.shape[:-1]) < 0.03] = 0
    scores = g.uniform(0.3, 1.0, size=kp.shape[:-1]).astype(np.float32)
    return kp, scores


def per_clip_numpy(kp, scores, img_shape, flips, size=56):
    """The authors' per-clip steps in NumPy, one clip after another: box, shift, rescale, flip, render."""
    order = list(range(17))
    for left, right in COCO17_FLIP_PAIRS:
        order[left], order[right] = right, left
    out = []
    for clip, score, flip in zip(kp, scores, flips):
        x0, y0, x1, y1 = compact_box(clip, img_shape)
        clip = clip.copy()
        x, y = clip[..., 0], clip[..., 1]
        x[x != 0] -= x0
        y[y != 0] -= y0
        clip *= np.array([size / (x1 - x0), size / (y1 - y0)], dtype=np.float32)
        if flip:
            x = clip[..., 0]
            x[x != 0] = size - 1 - x[x != 0]
            clip, score = clip[:, :, order], score[:, :, order]
        out.append(render_heatmaps_reference(torch.from_numpy(clip)[None], torch.from_numpy(score)[None], size, 0.6,
                                             eps=1e-4))
    return torch.cat(out)


def test_heatmap_step(compare, device):
    clips = 8
    kp, scores = poses(clips)
    flips = np.arange(clips) % 2 == 0
    batch = {"keypoint": torch.from_numpy(kp), "keypoint_score": torch.from_numpy(scores),
             "img_shape": torch.tensor([[1080, 1920]] * clips), "flip": torch.from_numpy(flips),
             "label": torch.zeros(clips, dtype=torch.int64)}
    transform = BatchTransform(DataConfig(), modalities=("pose",)).to(device)
    impls = {"reference": lambda: per_clip_numpy(kp, scores, (1080, 1920), flips),
             "batched": lambda: transform(batch, device)[1]}
    torch.testing.assert_close(impls["batched"]().cpu(), impls["reference"](), rtol=0, atol=1e-6)
    nbytes = clips * 17 * 48 * 56 * 56 * 4
    compare("heatmap step", f"{clips} clips, 2 persons, 48 frames -> (8, 17, 48, 56, 56)", impls, device=device,
            bytes_moved=nbytes, cuda_calls=5)
