"""The package around the ops: its metadata, build information, the command line, the tests' requirements, the
docs."""
import importlib
import json
import pathlib
import re
import subprocess
import sys
import tomllib

import torch

import epamx
from testkit import TEST_REQUIREMENTS

REPO = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "epamx", *args], capture_output=True, text=True, timeout=300)


def test_build_info_describes_this_build():
    info = epamx.build_info()
    assert info["version"] == epamx.__version__
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["openmp"], "built without OpenMP: at::parallel_for would run on one thread"
    assert info["cuda"] == bool(info["cuda_archs"])
    # The vectorised CPU kernels follow torch's own choice of instruction set: AVX512 or AVX2 on x86, else DEFAULT.
    capability = torch.backends.cpu.get_cpu_capability()
    assert info["cpu_isa"] == (capability if capability in ("AVX2", "AVX512") else "DEFAULT")
    if torch.cuda.is_available() and torch.backends.cuda.is_built():
        assert info["cuda"], "torch has CUDA and a GPU, but epamx was built without its CUDA kernels"


def test_cli_info_json():
    result = _run("info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["epamx"] == epamx.__version__
    assert "CPU" in info["compiled backends"]
    assert "epamx::temporal_shift" in info["operators"]
    assert info["torch threads"] >= 1


def test_cli_info_model_matches_the_reference_figures():
    result = _run("info", "--model", "--json", "--num-classes", "120")
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)["model"]
    assert model["RGB backbone parameters"] == "1,980,030" and model["pose backbone parameters"] == "519,580"
    assert model["total parameters"].startswith("2,577,717")
    assert model["RGB backbone GMACs"] == "4.26" and model["pose backbone GMACs"] == "3.36"


def test_cli_rejects_unknown_command():
    result = _run("frobnicate")
    assert result.returncode == 2
    assert "frobnicate" in result.stderr


def test_version_has_one_source():
    # pyproject.toml's version, passed to CMake by setup.py and baked into the extension: a stale build differs.
    assert epamx.__version__ == PROJECT["version"]


def test_console_script_is_the_cli(capsys):
    module, function = PROJECT["scripts"]["epamx"].split(":")
    main = getattr(importlib.import_module(module), function)
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epamx"] == epamx.__version__


def test_the_tests_require_the_train_and_dev_extras():
    # tests/conftest.py stops a session that lacks one of them (pytest runs it; ruff, the linter, is no test's).
    extras = PROJECT["optional-dependencies"]
    wanted = {re.split(r"[<>=!~\[; ]", spec)[0].lower() for spec in extras["train"] + extras["dev"]} - {"pytest", "ruff"}
    assert set(TEST_REQUIREMENTS.values()) == wanted


def test_package_data_and_license():
    assert (REPO / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    package = pathlib.Path(epamx.__file__).parent
    assert (package / "py.typed").is_file() and list((package / "configs").glob("*.toml"))


def test_documentation_is_in_the_repository():
    # A clone has docs/epamnet.md and nothing beside the repository: no file may send readers outside it.
    sources = [REPO / name for name in ("README.md", "CMakeLists.txt", "setup.py", "pyproject.toml")]
    for folder in ("epamx", "csrc", "tests", "bench", "tools", "docs"):
        sources += [p for p in (REPO / folder).rglob("*") if p.suffix in {".py", ".md", ".h", ".cpp", ".cu", ".cuh",
                                                                           ".sh", ".toml", ".txt"}]
    # Spelled in pieces, so that this file does not point there itself.
    needles = ("/".join(("..", "shared")), "REFERENCE" + ".md")
    outside = [str(p.relative_to(REPO)) for p in sources
               if p.is_file() and any(s in p.read_text(encoding="utf-8") for s in needles)]
    assert not outside, f"these files point outside the repository: {outside}"
    doc = (REPO / "docs" / "epamnet.md").read_text(encoding="utf-8")
    # The figures the model's tests check, as the reference states them.
    for figure in ("1,980,030", "519,580", "2,538,717 / 2,577,717", "| 107 |", "4.26 G", "3.36 G", "eps 1e-4"):
        assert figure in doc, f"docs/epamnet.md does not state {figure!r}"
