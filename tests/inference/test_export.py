"""Export: a tiny trained run written as an ONNX file (run with ONNX Runtime against the eager model, at dynamic
batch sizes, on random and on held-out clips) and as a torch.export program (saved, loaded, run); one-stream
checkpoints; the file's graph, size and contract; bad input as one line with exit status 2."""
import importlib.util
import json

import pytest
import torch

import epamx
from epamx import inference
from epamx.cli import main
from epamx.errors import CheckpointError, ConfigError
from epamx.inference.export import DECOMPOSITIONS, MIN_OPSET
from epamx.models import read_checkpoint
from epamx.ops import temporal_shift_reference
from test_cli import assert_one_line_error, cli, one_thread, tiny

pytestmark = pytest.mark.slow
ONNX_REASON = "ONNX export needs the export extra: pip install 'epamx[export]'"


def _ort():
    return pytest.importorskip("onnxruntime", reason=ONNX_REASON)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run's folder (the three stages, one epoch each)."""
    root = tmp_path_factory.mktemp("export")
    with one_thread():
        assert main(["train", *tiny(root)]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def onnx_file(run):
    """The run's EPAM-Net stage exported by `epamx export` (in the run folder: predict --onnx finds its config)."""
    _ort()
    pytest.importorskip("onnxscript", reason=ONNX_REASON)
    out = run / "epamnet.onnx"
    with one_thread():
        assert main(["export", str(run), "--out", str(out)]) == 0
    return out


@pytest.fixture(autouse=True)
def single_thread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with one_thread():
        yield


def random_inputs(contract, batch):
    torch.manual_seed(batch)
    shapes = {i["name"]: (batch, *i["shape"][1:]) for i in contract["inputs"]}
    return {name: torch.randn(shape) if name == "imgs" else torch.rand(shape) for name, shape in shapes.items()}


def eager_logits(model, inputs):
    with torch.no_grad():
        out = model(*inputs.values())
    return out if isinstance(out, tuple) else (out,)


def weight_bytes(checkpoint):
    return sum(t.numel() * t.element_size() for t in read_checkpoint(checkpoint).state_dict().values()
               if t.is_floating_point())


# ---- ONNX ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_runtime_matches_eager(onnx_file, run, batch):
    ort = _ort()
    loaded = inference.load(run, device="cpu")
    contract = inference.read_contract(onnx_file)
    inputs = random_inputs(contract, batch)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {name: x.numpy() for name, x in inputs.items()})
    assert [o.name for o in session.get_outputs()] == ["rgb_logits", "pose_logits"]
    for got, want in zip(outputs, eager_logits(loaded.model, inputs)):
        assert got.shape == (batch, 12)
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=1e-4)


def test_onnx_file_is_standard_small_and_carries_its_contract(onnx_file, run):
    import onnx

    model = onnx.load(str(onnx_file))
    onnx.checker.check_model(model)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert [o.domain for o in model.opset_import] == [""] and model.opset_import[0].version == MIN_OPSET
    # the weights (batch norm folded in) and a graph without tracing records: not activation-sized constants
    weights = weight_bytes(run / "epamnet" / "final.pt")
    assert 0.8 * weights < onnx_file.stat().st_size < 1.15 * weights
    assert not any(p.key for n in model.graph.node for p in n.metadata_props)

    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert inputs == {"imgs": ["batch", 3, 2, 32, 32], "heatmaps": ["batch", 17, 6, 8, 8]}
    contract = inference.read_contract(onnx_file)
    assert {p.key: json.loads(p.value) for p in model.metadata_props} == contract
    assert contract["mode"] == "epamnet" and contract["outputs"] == ["rgb_logits", "pose_logits"]
    assert [i["shape"] for i in contract["inputs"]] == list(inputs.values())
    assert contract["class_names"] == inference.load(run, device="cpu").class_names
    assert contract["rgb_normalisation"]["mean"] == [123.675, 116.28, 103.53]
    assert contract["heatmaps"] == {"size": 8, "sigma": 0.6, "eps": 1e-4, "skeleton": "coco17", "channels": 17,
                                    "limbs": False}
    assert contract["sampling"] == {"clip_len": 6, "rgb_every": 3, "frame_size": 32, "max_persons": 2,
                                    "pipeline": "multimodal"}
    assert contract["epamx_version"] == epamx.__version__


def test_onnx_gives_the_checkpoints_answers_on_held_out_clips(onnx_file, run):
    loaded = inference.load(run, device="cpu")
    exported = inference.load_onnx(onnx_file)
    clips = inference.clips(exported.config, exported.class_names, exported.mode)
    clips.annotations = clips.annotations[:6]
    want = inference.predict(loaded.optimized(), loaded.config, clips, top_k=3)
    got = inference.predict(exported, exported.config, clips, top_k=3)
    assert [r["top"][0][0] for r in got] == [r["top"][0][0] for r in want]
    assert [r["streams"] for r in got] == [r["streams"] for r in want]
    for g, w in zip(got, want):
        assert [s for _, s in g["top"]] == pytest.approx([s for _, s in w["top"]], abs=2e-4)


def test_predict_onnx_equals_predict(onnx_file, run, capsys):
    rc, out, err = cli(capsys, "predict", "--checkpoint", run, "--limit", 4, "--json")
    assert rc == 0, err
    want = json.loads(out)
    rc, out, err = cli(capsys, "predict", "--onnx", onnx_file, "--limit", 4, "--json")
    assert rc == 0, err
    got = json.loads(out)
    assert got["onnx"] == str(onnx_file) and len(got["clips"]) == 4
    assert got["clips"] == want["clips"]


def test_a_one_stream_checkpoint_exports_its_stream_alone(run, tmp_path):
    ort = _ort()
    pytest.importorskip("onnxscript", reason=ONNX_REASON)
    checkpoint = run / "pose" / "final.pt"
    out = inference.export_onnx(checkpoint, tmp_path / "pose.onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["heatmaps"]
    assert [o.name for o in session.get_outputs()] == ["pose_logits"]
    contract = inference.read_contract(out)
    assert contract["mode"] == "pose" and [i["name"] for i in contract["inputs"]] == ["heatmaps"]
    loaded = inference.load(checkpoint, device="cpu")
    for batch in (1, 3):
        inputs = random_inputs(contract, batch)
        (got,) = session.run(None, {name: x.numpy() for name, x in inputs.items()})
        torch.testing.assert_close(torch.from_numpy(got), eager_logits(loaded.model, inputs)[0], rtol=0, atol=1e-4)
    assert out.stat().st_size < 1.15 * weight_bytes(checkpoint)


def test_the_temporal_shift_decomposition_is_the_reference():
    shift = DECOMPOSITIONS[torch.ops.epamx.temporal_shift.default]
    x = torch.randn(3, 19, 5, 4, 3)
    for fold_div in (1, 4, 8, 30):
        assert torch.equal(shift(x, fold_div), temporal_shift_reference(x, fold_div))
    frames = torch.randn(2 * 5, 16, 3, 3)
    assert torch.equal(shift(frames, 4, 5), temporal_shift_reference(frames, 4, 5))


# ---- torch.export --------------------------------------------------------------------------------------------------

def test_program_matches_eager_and_round_trips(run, tmp_path, capsys):
    out = tmp_path / "epamnet.pt2"
    rc, stdout, err = cli(capsys, "export", run, "--format", "pt2", "--out", out)
    assert rc == 0, err
    assert stdout.startswith(f"written: {out}")
    program = torch.export.load(out)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"epamx.temporal_shift.default", "epamx.channel_pool.default",
            "epamx.attention_reweight.default"} <= targets
    contract = inference.read_contract(out)
    assert contract["mode"] == "epamnet" and contract["inputs"][0]["shape"][0] == "batch"
    loaded = inference.load(run, device="cpu")
    module = program.module()
    for batch in (1, 3):
        inputs = random_inputs(contract, batch)
        with torch.no_grad():
            got = module(*inputs.values())
        for g, w in zip(got, eager_logits(loaded.model, inputs)):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-4)


# ---- bad input -----------------------------------------------------------------------------------------------------

def test_bad_input_is_one_line(run, tmp_path, capsys):
    out = tmp_path / "x.onnx"
    assert_one_line_error(*cli(capsys, "export", run, "--format", "tflite", "--out", out), "export",
                          "unknown format 'tflite'", "onnx, pt2")
    # Without the export extra, that is the first thing said.
    opset = (("opset 13 is too old", f"minimum is {MIN_OPSET}") if importlib.util.find_spec("onnx")
             else ("needs the onnx package",))
    assert_one_line_error(*cli(capsys, "export", run, "--opset", 13, "--out", out), "export", *opset)
    assert_one_line_error(*cli(capsys, "export", run, "--format", "pt2", "--opset", 18, "--out", out), "export",
                          "ONNX only")
    # The checkpoint's errors, in the format that needs no extra.
    program = tmp_path / "x.pt2"
    bare = tmp_path / "bare.pt"
    torch.save({"conv.weight": torch.randn(2, 2)}, bare)
    assert_one_line_error(*cli(capsys, "export", bare, "--format", "pt2", "--out", program), "export", str(bare),
                          "not an epamx training checkpoint")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    assert_one_line_error(*cli(capsys, "export", text, "--format", "pt2", "--out", program), "export", str(text),
                          "cannot be read")
    assert_one_line_error(*cli(capsys, "export", tmp_path / "none", "--format", "pt2", "--out", program), "export",
                          "does not exist")
    assert not out.exists() and not program.exists()
    assert_one_line_error(*cli(capsys, "predict", "--onnx", tmp_path / "none.onnx"), "predict", "does not exist")
    with pytest.raises(ConfigError, match="batch_size"):
        inference.export_program(run, tmp_path / "x.pt2", batch_size=0)


def test_an_onnx_file_not_from_epamx_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx", reason=ONNX_REASON)
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(CheckpointError, match="not an ONNX file exported by epamx"):
        inference.read_contract(path)
