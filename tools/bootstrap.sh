#!/usr/bin/env bash
# Sets up everything epamx needs in ./.venv and builds it in place; safe to rerun (it only does what is missing).
#   torch is pinned (EPAMX_TORCH, default torch==2.13.0): pip never resolves a newer or CUDA torch here.
#   Where nvcc exists but torch has no CUDA, every .cu file is still compiled (not linked) as a check;
#   EPAMX_CUDA_COMPILE_CHECK=1 demands it, =0 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${EPAMX_VENV:-.venv}
TORCH_SPEC=${EPAMX_TORCH:-torch==2.13.0}
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"

if [ ! -x "$VENV/bin/python" ]; then
  echo "epamx bootstrap: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "epamx bootstrap: installing $TORCH_SPEC"
  "${PIP[@]}" "$TORCH_SPEC"
fi
missing=$("$PY" - <<'PY'
import importlib.util
need = {"pytest": "pytest", "pytest_benchmark": "pytest-benchmark", "numpy": "numpy", "setuptools": "setuptools",
        "wheel": "wheel", "cmake": "cmake>=3.24", "ninja": "ninja",
        # data and training: video decoding/encoding (FFmpeg inside), JPEG frames, progress bars, PNG plots
        "av": "av>=12", "PIL": "pillow", "tqdm": "tqdm", "matplotlib": "matplotlib"}
print(" ".join(spec for module, spec in need.items() if importlib.util.find_spec(module) is None))
PY
)
if [ -n "$missing" ]; then
  echo "epamx bootstrap: installing $missing"
  # shellcheck disable=SC2086
  "${PIP[@]}" $missing
fi

if [ -z "${EPAMX_CUDA_COMPILE_CHECK:-}" ]; then
  torch_cuda=$("$PY" -c "import torch; print(int(torch.backends.cuda.is_built()))")
  if command -v nvcc >/dev/null && [ "$torch_cuda" = 0 ]; then export EPAMX_CUDA_COMPILE_CHECK=1; fi
fi

echo "epamx bootstrap: building the extension (log: build/bootstrap.log)"
mkdir -p build
export PATH="$PWD/$VENV/bin:$PATH"  # the venv's cmake and ninja
if ! "$PY" -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps -e . >build/bootstrap.log 2>&1; then
  tail -n 60 build/bootstrap.log
  echo "epamx bootstrap: build failed; full log in build/bootstrap.log" >&2
  exit 1
fi
grep -E -- "-- epamx: " build/bootstrap.log | sed -E 's/^ *-- //' || true
# not piped into head: head exits after six lines and info would die of a broken pipe (failing the script)
"$PY" -m epamx info > build/info.txt
head -n 6 build/info.txt
