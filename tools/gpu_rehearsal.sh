#!/usr/bin/env bash
# The GPU machine's software, rehearsed on a machine without a GPU, so that a short GPU lease is not spent on a
# build or a torch-version failure. In a venv of its own: the GPU image's Python (3.12) and torch (2.11.0, built with
# CUDA 13, from PyPI), epamx built with its CUDA kernels for sm_90 as tools/gpu_check.sh's build stage builds them
# (nvcc needed, no GPU), then the test suite on the CPU against that build, then gpu_check.sh's dry run with it.
#
#   bash tools/gpu_rehearsal.sh [--venv DIR] [--python PYTHON] [--torch VERSION] [--no-tests]
#
# Needs network (PyPI) and about 5.5 GB in DIR (default /tmp/epamx-gpu-rehearsal) for torch's CUDA wheels; reuses
# them when DIR exists. Writes build/cmake-cpython-312-*/ and epamx/_C.cpython-312-*.so (both git-ignored) beside
# the usual build, and build/gpu-rehearsal/ (the logs, the dry run's files). Takes about 20 minutes on 2 cores.
# Exit status: 0 when every step passed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VENV=/tmp/epamx-gpu-rehearsal PYTHON=python3.12 TORCH=2.11.0 TESTS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV=$2; shift 2 ;;
    --python) PYTHON=$2; shift 2 ;;
    --torch) TORCH=$2; shift 2 ;;
    --no-tests) TESTS=0; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_rehearsal: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
command -v "$PYTHON" >/dev/null || { echo "gpu_rehearsal: $PYTHON not found (--python names another)" >&2; exit 2; }
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"
command -v nvcc >/dev/null || { echo "gpu_rehearsal: nvcc not found: the CUDA build needs the CUDA toolkit" >&2; exit 2; }
OUT="$ROOT/build/gpu-rehearsal"
rm -rf "$OUT" && mkdir -p "$OUT"
step() { echo "[gpu_rehearsal $(date +%H:%M:%S)] $*"; }

step "venv $VENV: $("$PYTHON" --version), torch==$TORCH and what the GPU image has"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# Pinned torch (its CUDA wheels come with it); the rest as the GPU image has them, plus PyAV, carried there.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH" numpy pybind11 ninja cmake pytest \
    pytest-benchmark pytest-timeout pytest-xdist av pillow tqdm matplotlib onnx onnxruntime onnxscript tensorboard \
    2> >(grep -v "^WARNING: Location" >&2)
"$VENV/bin/python" -c "import torch; assert torch.backends.cuda.is_built(), 'torch ' + torch.__version__ + ' has no CUDA'"
export PATH="$VENV/bin:$PATH" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

step "build: TORCH_CUDA_ARCH_LIST=9.0 EPAMX_CUDA=1 EPAMX_CUDA_ARCHS=90-real (log: $OUT/build.log)"
TORCH_CUDA_ARCH_LIST=9.0 EPAMX_CUDA=1 EPAMX_CUDA_ARCHS=90-real MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    python setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
python -c "import epamx, sys; i = epamx.build_info(); print(i); sys.exit(0 if i['cuda'] and i['cuda_archs'] == '90-real' else 1)"

if [ "$TESTS" = 1 ]; then
  step "tests on the CPU against the CUDA build (log: $OUT/tests.log)"
  python -m pytest tests -q -p no:cacheprovider --timeout 900 --ignore=tests/ops/test_cuda_emulated.py \
      > "$OUT/tests.log" 2>&1 || { grep -E "^(FAILED|ERROR)" "$OUT/tests.log"; tail -1 "$OUT/tests.log"; exit 1; }
  tail -1 "$OUT/tests.log"
fi

step "gpu_check.sh --dry-run with this Python (log: $OUT/dry-run.log)"
PYTHON="$VENV/bin/python" bash tools/gpu_check.sh --dry-run --out "$OUT/dry-run" > "$OUT/dry-run.log" 2>&1 \
    || { tail -30 "$OUT/dry-run.log"; exit 1; }
grep -E "^\| [a-z-]+ \|" "$OUT/dry-run.log" | head -12
step "passed"
