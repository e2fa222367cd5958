#!/usr/bin/env bash
# Sets up everything epamx needs in ./.venv and builds it in place; safe to rerun (it only does what is missing).
#   torch is pinned (EPAMX_TORCH, default torch==2.13.0): pip never resolves a newer or CUDA torch here, and never
#   replaces the torch installed (the build compiles against it).
#   Then pyproject.toml's build requirements, then epamx itself, editable, with the extras in EPAMX_EXTRAS
#   (default train,dev: training and the tests; see pyproject.toml's [project.optional-dependencies]).
#   Where nvcc exists but torch has no CUDA, every .cu file is still compiled (not linked) as a check;
#   EPAMX_CUDA_COMPILE_CHECK=1 demands it, =0 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${EPAMX_VENV:-.venv}
TORCH_SPEC=${EPAMX_TORCH:-torch==2.13.0}
EXTRAS=${EPAMX_EXTRAS:-train,dev}
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"

if [ ! -x "$VENV/bin/python" ]; then
  echo "epamx bootstrap: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "epamx bootstrap: installing $TORCH_SPEC"
  "${PIP[@]}" "$TORCH_SPEC"
fi
# Whatever else gets installed, torch stays the one installed now.
CONSTRAINT="$VENV/epamx-torch-constraint.txt"
"$PY" -W ignore -c "import torch; print(f'torch=={torch.__version__}')" > "$CONSTRAINT"
PIP+=(-c "$CONSTRAINT")
# pip installs no build requirements when the build is not isolated: they are read from pyproject.toml.
mapfile -t build_requires < <("$PY" - <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    print(*tomllib.load(f)["build-system"]["requires"], sep="\n")
PY
)
"${PIP[@]}" "${build_requires[@]}"

if [ -z "${EPAMX_CUDA_COMPILE_CHECK:-}" ]; then
  torch_cuda=$("$PY" -W ignore -c "import torch; print(int(torch.backends.cuda.is_built()))")
  if command -v nvcc >/dev/null && [ "$torch_cuda" = 0 ]; then export EPAMX_CUDA_COMPILE_CHECK=1; fi
fi

# The `pose` extra is installed apart (pyproject.toml says why): mediapipe without its dependencies (its wheels
# declare numpy<2), then the extra's other requirements, with the NumPy installed held where it is.
pip_extras=$(echo ",$EXTRAS," | sed -e 's/,pose,/,/g' -e 's/^,*//' -e 's/,*$//')
target=".${pip_extras:+[$pip_extras]}"
echo "epamx bootstrap: building the extension and installing $target (log: build/bootstrap.log)"
mkdir -p build
export PATH="$VENV/bin:$PATH"  # the venv's cmake and ninja
if ! "$PY" -m pip install -v --disable-pip-version-check -c "$CONSTRAINT" --no-build-isolation -e "$target" \
     >build/bootstrap.log 2>&1; then
  tail -n 60 build/bootstrap.log
  echo "epamx bootstrap: build failed; full log in build/bootstrap.log" >&2
  exit 1
fi
if [[ ",$EXTRAS," == *",pose,"* ]]; then
  mapfile -t pose_requires < <("$PY" - <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    pose = tomllib.load(f)["project"]["optional-dependencies"]["pose"]
print(*sorted(pose, key=lambda r: not r.startswith("mediapipe")), sep="\n")  # mediapipe first
PY
  )
  NUMPY_CONSTRAINT="$VENV/epamx-numpy-constraint.txt"
  "$PY" -c "import numpy; print(f'numpy=={numpy.__version__}')" > "$NUMPY_CONSTRAINT"
  echo "epamx bootstrap: installing the pose extra (${pose_requires[0]} without its dependencies)"
  "${PIP[@]}" --no-deps "${pose_requires[0]}"
  "${PIP[@]}" -c "$NUMPY_CONSTRAINT" "${pose_requires[@]:1}"
fi
grep -E -- "-- epamx: " build/bootstrap.log | sed -E 's/^ *-- //' || true
# not piped into head: head exits after six lines and info would die of a broken pipe (failing the script)
"$VENV/bin/epamx" info > build/info.txt
head -n 6 build/info.txt
