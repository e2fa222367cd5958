"""EPAM-Net inference on a CPU: epamx against ONNX Runtime, in float32 and bfloat16, all in the same run.

One case per batch (1 and 8 clips at the paper's sizes: 16 RGB frames at 224x224, 48 heatmap frames of 17 joints at
56x56), every implementation with the same weights and inputs, ONNX Runtime with as many intra-op threads as torch:

    ort_authors     ONNX Runtime on the authors' model (bench/authors_model.py) exported by torch.onnx.export
                    (dynamo=False, the TorchScript exporter; a fixed batch: it traces the temporal shift's zeros_like
                    into constant zero tensors of every activation's shape, which is what makes the file large)
    ort_epamx       ONNX Runtime on epamx's own export (epamx.inference.export_onnx: batch norm folded, the fused ops
                    as standard operators, dynamic batch), float32
    optimized       epamx.models.optimize_for_inference(model), float32 (each forward in epamx.memory.cpu_cache)
    optimized_nocache  the same with cache_memory=False (fresh activation memory every forward)
    optimized_bf16  optimize_for_inference(model, dtype=torch.bfloat16): bf16 weights and activations
    autocast_bf16   the float32 optimized model under torch.autocast("cpu", torch.bfloat16) (weights cast per call)
    compiled        torch.compile(optimize_for_inference(model), fullgraph=True), inductor with freezing (weights
                    folded and prepacked, as PyTorch recommends for CPU inference), each call in cpu_cache()

Goals (CPU with avx512_bf16, 2 threads): optimized >= 1.5x both ORT runs; optimized_bf16 >= 1.6x optimized; >= 50%
of the CPU's float32 FMA peak at batch 8; compiled kept working (fullgraph) and in the table. Printed under the table: the fraction of that peak each implementation
reaches (EPAM-Net's 7.62 GMACs per clip; peak = cores x clock x 32 flops/cycle, i.e. AVX-512 FMA: 16 fp32 lanes x
2 flops, one FMA issue per cycle assumed; the clock from /proc/cpuinfo, the nominal one: boost clocks are higher)
and the same against 64 flops/cycle (cores with two full 512-bit FMA pipes, such as AMD Zen 5), and the ONNX files'
sizes.
"""
import os

import pytest
import torch

from authors_model import AuthorsEPAMNet, load_epamx_state_dict
from epamx.config import load_config
from epamx.inference import LoadedModel
from epamx.inference.export import export_onnx
from epamx.memory import cpu_cache
from epamx.models import EPAMNet, optimize_for_inference

ort = pytest.importorskip("onnxruntime")
GMACS_PER_CLIP = 7.62
FLOPS_PER_CYCLE_PER_CORE = 32  # fp32 AVX-512 FMA: 16 lanes x 2 flops (multiply + add), one FMA per cycle assumed
BATCHES = [1, 8]
# ONNX Runtime's idle intra-op threads spin for tens of ms after a run: measured here, a PyTorch forward started
# right after one ran 1.2x slower than after a 50 ms pause. Every timed call waits this long first.
SETTLE_S = 0.1


def _clip(batch):
    g = torch.Generator().manual_seed(batch)
    return torch.randn(batch, 3, 16, 224, 224, generator=g), torch.rand(batch, 17, 48, 56, 56, generator=g)


def _clock_hz() -> float:
    """The CPU clock /proc/cpuinfo reports (cpu MHz of the first CPU)."""
    with open("/proc/cpuinfo") as f:
        mhz = next(float(line.split(":", 1)[1]) for line in f if line.startswith("cpu MHz"))
    return mhz * 1e6


def _peak_flops() -> float:
    return torch.get_num_threads() * _clock_hz() * FLOPS_PER_CYCLE_PER_CORE


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_run(session, imgs, heatmaps):
    names = [i.name for i in session.get_inputs()]
    feed = {names[0]: imgs.numpy(), names[1]: heatmaps.numpy()}
    return lambda: session.run(None, feed)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The EPAM-Net every implementation runs (random weights, 60 classes), the authors' model holding them, and
    epamx's ONNX export of it (dynamic batch)."""
    torch.manual_seed(0)
    model = EPAMNet(num_classes=60).eval()
    authors = load_epamx_state_dict(AuthorsEPAMNet(num_classes=60), model.state_dict()).eval()
    folder = tmp_path_factory.mktemp("onnx")
    cfg = load_config("ntu60_xsub")
    loaded = LoadedModel(folder, cfg, torch.device("cpu"), model,
                         {"mode": "epamnet", "num_classes": 60, "pose_channels": 17})
    epamx_onnx = export_onnx(loaded, folder / "epamx.onnx")
    return model, authors, folder, epamx_onnx


def _export_authors(authors, folder, imgs, heatmaps):
    path = folder / f"authors_b{imgs.shape[0]}.onnx"
    if not path.exists():
        with torch.no_grad():
            torch.onnx.export(authors, (imgs, heatmaps), str(path), dynamo=False, opset_version=17,
                              input_names=["imgs", "heatmaps"], output_names=["rgb_logits", "pose_logits"])
    return path


@pytest.mark.parametrize("batch", BATCHES)
def test_inference_vs_onnxruntime(compare, record_metric, models, batch):
    model, authors, folder, epamx_onnx = models
    imgs, heatmaps = _clip(batch)
    authors_onnx = _export_authors(authors, folder, imgs, heatmaps)
    fast = optimize_for_inference(model)
    fast_nocache = optimize_for_inference(model, cache_memory=False)
    fast_bf16 = optimize_for_inference(model, dtype=torch.bfloat16)
    compiled = torch.compile(optimize_for_inference(model), fullgraph=True)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        compiled(imgs, heatmaps)  # compiles, with freezing

    def torch_run(m, autocast=False):
        def run():
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                return m(imgs, heatmaps)
        return run

    def compiled_run():
        with torch.no_grad(), cpu_cache():
            return compiled(imgs, heatmaps)

    impls = {
        "ort_authors": _ort_run(_session(authors_onnx), imgs, heatmaps),
        "ort_epamx": _ort_run(_session(epamx_onnx), imgs, heatmaps),
        "optimized": torch_run(fast),
        "optimized_nocache": torch_run(fast_nocache),
        "optimized_bf16": torch_run(fast_bf16),
        "autocast_bf16": torch_run(fast, autocast=True),
        "compiled": compiled_run,
    }
    with torch.no_grad():
        want = authors(imgs, heatmaps)
    for name, run in impls.items():
        got = [torch.as_tensor(x).float() for x in run()]
        tol = 5e-2 if "bf16" in name else 1e-3
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=tol, msg=name)
            if "bf16" in name:
                assert torch.equal(g.argmax(1), w.argmax(1)), name

    case = compare("EPAMNet inference vs ONNX Runtime", f"batch {batch}, 60 classes", impls, device="cpu",
                   baseline="ort_authors", repeats=8 if batch == 1 else 3, settle=SETTLE_S,
                   ratios=[("optimized", "ort_epamx"), ("optimized_bf16", "ort_epamx"),
                           ("optimized_bf16", "optimized"), ("autocast_bf16", "optimized"),
                           ("optimized", "optimized_nocache"), ("compiled", "optimized"), ("compiled", "ort_epamx"),
                           ("ort_epamx", "ort_authors")])
    peak = _peak_flops()
    for name in impls:
        achieved = 2 * GMACS_PER_CLIP * 1e9 * batch / case.seconds(name)
        record_metric("fraction of the fp32 FMA peak", f"batch {batch}, {name}",
                      f"{achieved / peak:.0%} ({achieved / 1e9:.0f} of {peak / 1e9:.0f} GFLOP/s: "
                      f"{torch.get_num_threads()} cores x {_clock_hz() / 1e9:.2f} GHz x "
                      f"{FLOPS_PER_CYCLE_PER_CORE} flops/cycle; {achieved / (2 * peak):.0%} of a core with two "
                      f"512-bit FMA pipes, 64 flops/cycle)")
    for name, path in (("authors (TorchScript exporter)", authors_onnx), ("epamx (export_onnx)", epamx_onnx)):
        record_metric("ONNX file size", f"batch {batch}, {name}", f"{os.path.getsize(path) / 2**20:.1f} MiB")
