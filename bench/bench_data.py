"""The input pipeline: loader throughput on a small embedded dataset (24 clips of 48 frames at 64x64, clip_len 48,
16 RGB frames; videos vs JPEG folders; 0, 1 and 2 worker processes), and the heatmap step: BatchTransform (crop,
rescale, flip and render, batched on the device) against the same heatmaps made per clip in NumPy as the authors'
pipeline does (MMCompact -> Resize -> Flip -> GeneratePoseTarget, epamx.ops.render_heatmaps_reference).

Loader rows time one epoch (batch 4, persistent workers, so worker start-up is not counted); clips/s and the ratios
(to the single-process loader, frames to video) are listed under the table. On a CPU that other processes keep busy,
every 2-thread OpenMP region waits for its second thread to be scheduled (torch.stack of a batch's frames took
20 ms instead of 0.04 ms on the shared 2-core machines), which the single-process loader pays in collate and
workers (1 thread each) do not; --bench-threads 1 shows the difference."""
import numpy as np
import pytest
import torch

from epamx.data import BatchTransform, DataConfig, EmbeddedConfig, build_dataset, build_embedded, build_loader
from epamx.data.transforms import compact_box
from epamx.ops import COCO17_FLIP_PAIRS, render_heatmaps_reference

CLIPS_PER_CLASS = 2
_CLIPS_PER_S: dict = {}


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("epamx-cache")


def _config(cache, fmt):
    return DataConfig(cache_dir=str(cache), frame_size=64, heatmap_size=16, embedded=EmbeddedConfig(
        train_per_class=CLIPS_PER_CLASS, val_per_class=1, frames=48, image_size=64, format=fmt))


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("fmt", ["video", "frames"])
def test_loader_throughput(measure, benchmark, record_metric, embedded_cache, fmt, workers):
    cfg = _config(embedded_cache, fmt)
    build_embedded(cfg, progress=False)
    dataset = build_dataset(cfg, "train", train=True, progress=False)
    loader = build_loader(dataset, batch_size=4, train=True, seed=0, workers=workers)
    epoch = iter(range(1_000_000))

    def one_epoch():
        loader.sampler.set_epoch(next(epoch))
        return sum(len(batch["label"]) for batch in loader)

    assert one_epoch() == len(dataset)  # starts the workers
    case = f"{fmt}, {len(dataset)} clips of 48 frames 64x64, batch 4"
    measure("loader epoch", case, f"{workers} workers", one_epoch, 0, torch.device("cpu"))
    clips_per_s = len(dataset) / benchmark.stats.stats.median
    _CLIPS_PER_S[(fmt, workers)] = clips_per_s
    base = _CLIPS_PER_S.get((fmt, 0))
    versus = f" ({clips_per_s / base:.2f}x 0 workers)" if base and workers else ""
    record_metric("loader clips/s", f"{fmt}, {workers} workers", f"{clips_per_s:.1f}{versus}")
    if fmt == "frames" and (("video", workers) in _CLIPS_PER_S):
        record_metric("loader frames vs video", f"{workers} workers",
                      f"{clips_per_s / _CLIPS_PER_S[('video', workers)]:.2f}x")
    del loader


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


@pytest.mark.parametrize("impl", ["reference", "batched"])
def test_heatmap_step(measure, device, impl):
    clips = 8
    kp, scores = poses(clips)
    flips = np.arange(clips) % 2 == 0
    batch = {"keypoint": torch.from_numpy(kp), "keypoint_score": torch.from_numpy(scores),
             "img_shape": torch.tensor([[1080, 1920]] * clips), "flip": torch.from_numpy(flips),
             "label": torch.zeros(clips, dtype=torch.int64)}
    transform = BatchTransform(DataConfig(), modalities=("pose",)).to(device)
    if impl == "reference":
        fn = lambda: per_clip_numpy(kp, scores, (1080, 1920), flips)  # noqa: E731
    else:
        fn = lambda: transform(batch, device)[1]  # noqa: E731
        reference = per_clip_numpy(kp, scores, (1080, 1920), flips)
        torch.testing.assert_close(fn().cpu(), reference, rtol=0, atol=1e-6)
    nbytes = clips * 17 * 48 * 56 * 56 * 4
    measure("heatmap step", f"{clips} clips, 2 persons, 48 frames -> (8, 17, 48, 56, 56)", impl, fn, nbytes, device,
            cuda_calls=5)
