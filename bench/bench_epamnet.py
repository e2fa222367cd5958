"""EPAM-Net against the authors' model as they ship it (bench/authors_model.py, contiguous memory), all in the same run.

Inference on one clip (batch 1: 16 RGB frames at 224x224, 48 heatmap frames of 17 joints at 56x56), one case with
every way to run it, so that every ratio is same-run:

    authors                the authors' model as shipped (contiguous)
    authors_channels_last  the authors' model with model and clip in channels_last_3d (what a user could ask for)
    reference              EPAMNet on the plain-PyTorch reference ops, contiguous
    reference_channels_last                                              ... channels_last_3d
    fused_contiguous       EPAMNet on the fused ops, contiguous
    default                EPAMNet(num_classes).eval() as it comes: fused ops, channels_last_3d on a CPU ("auto")
    optimized              epamx.models.optimize_for_inference(model): batch norm folded, in-place Swish

Goals (CPU, 2 threads): optimized >= 2x authors and >= 1.25x authors_channels_last; default >= 1.5x authors.
Like with like: fused_contiguous vs reference, default vs reference_channels_last (the fused ops' gain in one
memory format); default vs fused_contiguous is the memory-format gain alone. test_epamnet_inference_compiled: the
optimized model under torch.compile (inductor) against eager.

Training step (forward, backward, clipping, SGD; batch 4 on a CPU, batch 12 with bf16 autocast on a GPU):
authors as shipped, EPAMNet on the reference ops and on the fused ops in the same memory format, and the fused
EPAMNet in the other format. Goals (CPU): fused >= 1.3x reference in the same format, >= 2x authors; peak memory
>= 15% below the reference ops (test_epamnet_training_peak_memory).
"""
import pytest
import torch

from authors_model import AuthorsEPAMNet, load_epamx_state_dict
from epamx.models import EPAMNet, optimize_for_inference, preferred_memory_format

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
CL = torch.channels_last_3d


def _clip(device, layout, batch=1):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, 3, 16, 224, 224, generator=g).to(device)
    heatmaps = torch.rand(batch, 17, 48, 56, 56, generator=g).to(device)
    return imgs.contiguous(memory_format=layout), heatmaps.contiguous(memory_format=layout)


def _model(device, layout, **kwargs):
    """EPAMNet in `layout` ("preserve": it runs in the layout its weights and inputs come in)."""
    torch.manual_seed(0)
    model = EPAMNet(num_classes=60, memory_format="preserve", **kwargs).eval().to(device)
    return model.to(memory_format=layout)


def _authors(device, layout, state, train=False):
    model = load_epamx_state_dict(AuthorsEPAMNet(num_classes=60), state).to(device).train(train)
    return model.to(memory_format=layout)


def _no_grad(model, imgs, heatmaps):
    def run():
        with torch.no_grad():
            return model(imgs, heatmaps)
    return run


def test_epamnet_inference_latency(compare, device):
    """Every implementation has the same weights; the logits are checked equal before timing."""
    torch.manual_seed(0)
    default = EPAMNet(num_classes=60).eval().to(device)
    state = default.state_dict()
    fast = optimize_for_inference(default)
    fast_layout = preferred_memory_format(device)
    clips = {layout: _clip(device, LAYOUTS[layout]) for layout in LAYOUTS}
    contiguous, channels_last = clips["contiguous"], clips["channels_last_3d"]
    impls = {
        "authors": _no_grad(_authors(device, torch.contiguous_format, state), *contiguous),
        "authors_channels_last": _no_grad(_authors(device, CL, state), *channels_last),
        "reference": _no_grad(_model(device, torch.contiguous_format, fused=False), *contiguous),
        "reference_channels_last": _no_grad(_model(device, CL, fused=False), *channels_last),
        "fused_contiguous": _no_grad(_model(device, torch.contiguous_format), *contiguous),
        "default": _no_grad(default, *contiguous),
        "optimized": _no_grad(fast, *contiguous),
    }
    want = impls["authors"]()
    for name, run in impls.items():
        for got, expected in zip(run(), want):
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3, msg=name)
    same_format = "reference_channels_last" if fast_layout == CL else "reference"
    compare("EPAMNet inference", "1 clip, 60 classes", impls, device=device, baseline="authors", cuda_calls=5,
            ratios=[("optimized", "authors_channels_last"), ("default", "authors_channels_last"),
                    ("fused_contiguous", "reference"), ("default", same_format),
                    ("default", "fused_contiguous"), ("optimized", "default")])


def test_epamnet_inference_compiled(compare, device):
    """What torch.compile (inductor, default mode) adds to the optimized model: one clip, compiled against eager in
    the same run (the compile itself, 15 s to minutes, happens before timing and is not counted)."""
    torch.manual_seed(0)
    fast = optimize_for_inference(EPAMNet(num_classes=60).eval().to(device))
    imgs, heatmaps = _clip(device, torch.contiguous_format)
    impls = {"optimized": _no_grad(fast, imgs, heatmaps),
             "optimized_inductor": _no_grad(torch.compile(fast), imgs, heatmaps)}
    for got, expected in zip(impls["optimized_inductor"](), impls["optimized"]()):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    compare("EPAMNet inference, torch.compile", "1 clip, 60 classes", impls, device=device, baseline="optimized",
            cuda_calls=5)


def _inference_call(shift: str, batch: int):
    """For peak_memory: EPAM-Net inference on `batch` clips, the temporal shift in place or out of place."""
    model = _model("cpu", torch.contiguous_format)
    for m in model.modules():
        if hasattr(m, "inplace_shift"):
            m.inplace_shift = shift == "inplace"
    imgs, heatmaps = _clip("cpu", torch.contiguous_format, batch)

    def run():
        with torch.no_grad():
            model(imgs, heatmaps)
    return run


def test_epamnet_inference_peak_memory(peak_memory, record_metric, device):
    """Peak resident memory of one forward pass above the resident memory before it, 4 clips: at batch 1 the
    difference is within the resident-memory noise of malloc's retained heap."""
    if device.type != "cpu":
        pytest.skip("peak resident memory is measured for CPU inference")
    peaks = {}
    for mode in ("inplace", "out_of_place"):
        peaks[mode] = peak_memory(_inference_call, mode, 4, device=device).above_start / 2**20
        record_metric("EPAMNet inference peak memory above start (MiB)", f"4 clips, shift {mode}", f"{peaks[mode]:.0f}")
    saved = peaks["out_of_place"] - peaks["inplace"]
    record_metric("EPAMNet inference peak memory saved by the in-place shift", "4 clips",
                  f"{saved:.0f} MiB ({saved / peaks['out_of_place']:.0%})")


def _training_step(model, imgs, heatmaps, labels, amp):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=3e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(imgs.device.type, dtype=torch.bfloat16, enabled=amp):
            rgb_logits, pose_logits = model(imgs, heatmaps)
            loss = torch.nn.functional.cross_entropy(rgb_logits, labels) + \
                torch.nn.functional.cross_entropy(pose_logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 40.0)
        optimizer.step()
    return step


def _training_impls(device, batch):
    """name -> (model, clip layout): the authors' as shipped; EPAMNet on the reference and the fused ops in the
    device's fast format; the fused EPAMNet in the other format."""
    fast = preferred_memory_format(device)
    other = torch.contiguous_format if fast == CL else CL
    torch.manual_seed(0)
    state = EPAMNet(num_classes=60).state_dict()
    names = {"authors": None, "reference": (False, fast), "fused": (True, fast), "fused_other_format": (True, other)}
    impls = {}
    for name, spec in names.items():
        if spec is None:
            impls[name] = (_authors(device, torch.contiguous_format, state, train=True), torch.contiguous_format)
        else:
            model = _model(device, spec[1], fused=spec[0]).train()
            model.load_state_dict(state)
            impls[name] = (model, spec[1])
    return impls


def _training_batch(device, batch):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 3, 16, 224, 224, generator=g).to(device),
            torch.rand(batch, 17, 48, 56, 56, generator=g).to(device),
            torch.randint(0, 60, (batch,), generator=g).to(device))


def test_epamnet_training_step(compare, device):
    """Forward + backward + clipping + SGD step: batch 12 with bfloat16 autocast on a GPU, batch 4 in float32 on a
    CPU. "fused_other_format" is the fused model in the format the device does not prefer (the format's gain)."""
    cuda = device.type == "cuda"
    batch = 12 if cuda else 4
    imgs, heatmaps, labels = _training_batch(device, batch)
    impls = {}
    for name, (model, layout) in _training_impls(device, batch).items():
        impls[name] = _training_step(model, imgs.contiguous(memory_format=layout),
                                     heatmaps.contiguous(memory_format=layout), labels, cuda)
    compare("EPAMNet training step", f"batch {batch}{', bf16 autocast' if cuda else ', fp32'}", impls, device=device,
            baseline="reference", cuda_calls=2, repeats=3,
            ratios=[("fused", "authors"), ("reference", "authors"), ("fused", "fused_other_format")])


def _training_call(name: str, batch: int, device: str):
    """For peak_memory: one training step of implementation `name` (see _training_impls)."""
    device = torch.device(device)
    model, layout = _training_impls(device, batch)[name]
    imgs, heatmaps, labels = _training_batch(device, batch)
    return _training_step(model, imgs.contiguous(memory_format=layout), heatmaps.contiguous(memory_format=layout),
                          labels, device.type == "cuda")


def test_epamnet_training_peak_memory(peak_memory, record_metric, device):
    """Peak memory of the first training step of a fresh process above the memory before it, batch 4 on a CPU
    (resident memory), batch 12 with bf16 autocast on a GPU (allocated memory). No warm-up step: after one, the
    allocator keeps the freed activations resident and the second step's peak hides in them."""
    batch = 12 if device.type == "cuda" else 4
    peaks = {}
    for name in ("authors", "reference", "fused"):
        peaks[name] = peak_memory(_training_call, name, batch, str(device), device=device,
                                  warmup=False).above_start / 2**20
        record_metric("EPAMNet training step peak memory above start (MiB)", f"batch {batch}, {name}",
                      f"{peaks[name]:.0f}")
    for other in ("reference", "authors"):
        saved = peaks[other] - peaks["fused"]
        record_metric(f"EPAMNet training step peak memory, fused vs {other}", f"batch {batch}",
                      f"{saved:.0f} MiB lower ({saved / peaks[other]:.0%})")
