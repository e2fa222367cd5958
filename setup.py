"""Build epamx's extension: setuptools drives CMake + Ninja, which compile epamx._C against the installed torch.
Everything else about the package (metadata, version, dependencies, extras, the console script) is in pyproject.toml.

    pip install -e ".[train,dev]" --no-build-isolation

Environment variables:
    EPAMX_CUDA=auto|1|0          build the CUDA kernels when possible (default), always (error if impossible), never
    EPAMX_CUDA_ARCHS="80;90"     CUDA architectures, CMake syntax
    EPAMX_CUDA_COMPILE_CHECK=1   compile every .cu with nvcc (no link) when the CUDA kernels are not built
    EPAMX_BUILD_TYPE=Release     CMake build type
    MAX_JOBS=N                   parallel compile jobs
"""
import os
import pathlib
import subprocess
import sys
import sysconfig
import tomllib

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = pathlib.Path(__file__).parent.resolve()
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
VERSION = PROJECT["version"]
MIN_TORCH = next(dep.removeprefix("torch>=") for dep in PROJECT["dependencies"] if dep.startswith("torch>="))
_CUDA_CHOICES = {"auto": "AUTO", "": "AUTO", "1": "ON", "on": "ON", "0": "OFF", "off": "OFF"}


def _require_torch():
    try:
        import torch  # noqa: F401
        import torch.utils
    except ImportError as exc:
        raise RuntimeError(
            "epamx compiles against the torch already installed, and none was found. Install torch first "
            "(here: pip install torch==2.13.0), then build with: pip install -e . --no-build-isolation"
        ) from exc
    if torch.__version__ < MIN_TORCH:  # a TorchVersion: compares as a version
        raise RuntimeError(
            f"epamx needs torch >= {MIN_TORCH} (its tests pass on 2.9.1, 2.11.0 and 2.13.0); this is torch "
            f"{torch.__version__}. Install a newer one first (here: pip install torch==2.13.0)"
        )
    return torch


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        torch = _require_torch()
        cuda = os.environ.get("EPAMX_CUDA", "auto").strip().lower()
        if cuda not in _CUDA_CHOICES:
            raise RuntimeError(f"EPAMX_CUDA must be one of auto, 1, 0; got {cuda!r}")
        out_dir = pathlib.Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        # A build folder per interpreter and torch that outlives pip's temporary ones: rebuilds are incremental.
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}-torch{torch.__version__}"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "-G", "Ninja",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('EPAMX_BUILD_TYPE', 'Release')}",
            f"-DEPAMX_OUTPUT_DIR={out_dir}",
            f"-DEPAMX_VERSION={VERSION}",
            f"-DEPAMX_CUDA={_CUDA_CHOICES[cuda]}",
            f"-DEPAMX_TORCH_HAS_CUDA={'ON' if torch.backends.cuda.is_built() else 'OFF'}",
            f"-DEPAMX_CUDA_COMPILE_CHECK={'ON' if os.environ.get('EPAMX_CUDA_COMPILE_CHECK') == '1' else 'OFF'}",
        ]
        if "EPAMX_CUDA_ARCHS" in os.environ:
            args.append(f"-DEPAMX_CUDA_ARCHS={os.environ['EPAMX_CUDA_ARCHS']}")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        # This Python environment's cmake and ninja (pip's, the build requirements) before any on PATH: a system
        # CMake may be too old for torch's CUDA package (3.25.1 cannot compile CUDA C++20).
        env = dict(os.environ, PATH=os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")]))
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], env=env)
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs], env=env)


setup(
    ext_modules=[CMakeExtension("epamx._C")],
    cmdclass={"build_ext": CMakeBuild},
)
