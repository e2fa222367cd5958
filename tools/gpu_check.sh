#!/usr/bin/env bash
# The whole proof of epamx's CUDA kernels on one GPU machine, from this checkout, with no downloads:
#
#   bash tools/gpu_check.sh --out DIR [stage ...]      stages, in order (default: all):
#     build       epamx._C with its CUDA kernels as machine code for this GPU (sm_XY-real, no PTX to JIT), with the
#                 machine's own python3 and torch; wheels from .whl/ (PyAV) installed into build/gpu-check/site
#     tests       the whole test suite with CUDA present (every device-parametrised test runs on cpu and cuda)
#     cuda-tests  tests/ops/test_cuda_vs_cpu.py: every kernel against the CPU kernel (dtypes, layouts, streams, int32)
#     sanitizer   compute-sanitizer memcheck, racecheck, initcheck and synccheck over tools/gpu_driver.py
#     bench       the microbenchmarks on CUDA: DIR/cuda-<gpu>.md (copy it to bench/results/)
#     model       EPAM-Net inference and training steps, fused vs reference, fp32 vs bf16: DIR/model.md
#     train       python -m epamx train, one epoch per stage, on the embedded dataset (needs PyAV)
#   bash tools/gpu_check.sh --dry-run --out DIR         every stage's plumbing on a CPU: commands printed, the driver
#                                                       and model script run on the CPU, tests only collected
#
# DIR (or $EPAMX_GPU_CHECK_OUT) receives one log per stage and summary.md; the summary table is printed last.
# Each stage is meant to finish well inside 10 minutes (EPAMX_GPU_CHECK_TIMEOUT, default 540 s, bounds each command).
# Optional: PYTHON (default python3), EPAMX_CUDA_ARCHS (default: this GPU's, e.g. 90-real),
# EPAMX_GPU_CHECK_PYTEST_ARGS (extra pytest arguments for tests and cuda-tests, e.g. "-n 8" with pytest-xdist).
# Wheels the machine lacks travel in .whl/ (ignored by git); fill it on a machine with network access:
#   python3 -m pip download av --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

ALL_STAGES=(build tests cuda-tests sanitizer bench model train)
OUT=${EPAMX_GPU_CHECK_OUT:-}
DRY=0
STAGES=()
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=${2:?--out needs a folder}; shift 2 ;;
    --out=*) OUT=${1#--out=}; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *)
      if [[ " ${ALL_STAGES[*]} " == *" $1 "* ]]; then STAGES+=("$1"); shift
      else echo "gpu_check: unknown stage or option '$1' (stages: ${ALL_STAGES[*]})" >&2; exit 2; fi ;;
  esac
done
[ -n "$OUT" ] || { echo "gpu_check: give an output folder: --out DIR (or EPAMX_GPU_CHECK_OUT)" >&2; exit 2; }
[ ${#STAGES[@]} -gt 0 ] || STAGES=("${ALL_STAGES[@]}")
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)

# The machine's python3 and torch; a dry run on a development machine uses the checkout's .venv (or, in a git
# worktree, the main checkout's) when python3 has no torch.
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ "$DRY" = 1 ] && ! python3 -c "import torch" 2>/dev/null; then
    for venv in "$ROOT/.venv" "$(git rev-parse --path-format=absolute --git-common-dir 2>/dev/null)/../.venv"; do
      if [ -x "$venv/bin/python" ]; then PYTHON=$(cd "$venv" && pwd)/bin/python; break; fi
    done
  fi
fi
"$PYTHON" -c "import torch" 2>/dev/null || { echo "gpu_check: $PYTHON cannot import torch; set PYTHON to one that can" >&2; exit 2; }
WORK="$ROOT/build/gpu-check"          # everything the stages make besides logs: wheels' site, dataset cache, runs
SITE="$WORK/site"
mkdir -p "$WORK"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"
LIMIT=${EPAMX_GPU_CHECK_TIMEOUT:-540}
PYTEST_EXTRA=${EPAMX_GPU_CHECK_PYTEST_ARGS:-}
# The tests need PyAV (tests/conftest.py): where it is neither importable nor carried in .whl/ (the build stage
# installs it), they run without it, and those that need it are skipped.
"$PYTHON" -c "import av" 2>/dev/null || compgen -G ".whl/av-*.whl" >/dev/null || export EPAMX_TEST_WITHOUT=av

# ---- helpers ---------------------------------------------------------------------------------------------------
NOTE=""
say() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
# run CMD...: print it, then run it under the stage timeout (a program, not a shell function)
run() { echo "+ $*"; timeout --kill-after=20 "$LIMIT" "$@"; }
show() { echo "+ (dry run, not run) $*"; }
py() { "$PYTHON" "$@"; }
gpu_slug() {
  py -c "import re, torch; n = torch.cuda.get_device_name().lower().replace('nvidia', ''); print(re.sub('[^a-z0-9]+', '-', n).strip('-'))"
}
# Whether the extension in the checkout has its CUDA kernels.
built_with_cuda() { py -c "import epamx, sys; sys.exit(0 if epamx.build_info()['cuda'] else 1)" 2>/dev/null; }
need_gpu() {
  if ! py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    NOTE="torch sees no CUDA GPU"; return 1
  fi
  if ! built_with_cuda; then NOTE="epamx._C has no CUDA kernels: run the build stage"; return 1; fi
}
# pytest's last summary line ("12 passed, 3 skipped in 4.2s") as the stage note.
pytest_note() {
  NOTE=$(grep -E '(passed|failed|skipped|errors?|deselected|no tests ran|collected).* in [0-9.]+s' "$1" | tail -1 \
         | sed -E 's/^=+ *//; s/ *=+$//')
}

# ---- stages: each returns 0 (pass), 1 (fail) or 3 (skipped), and sets NOTE ------------------------------------

stage_build() {
  py -c "import sys, torch; print('python', sys.version.split()[0], 'at', sys.executable); print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  local wheels=()
  shopt -s nullglob; wheels=(.whl/*.whl); shopt -u nullglob
  if [ ${#wheels[@]} -gt 0 ]; then
    if [ "$DRY" = 1 ]; then show "$PYTHON" -m pip install --no-index --no-deps --target "$SITE" "${wheels[@]}"
    else run "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" || { NOTE="installing .whl/ failed"; return 1; }; fi
  else
    echo "no wheels in .whl/: PyAV (av) only if the machine has it"
  fi
  py -c "import av; print('PyAV', av.__version__)" 2>/dev/null || echo "PyAV not importable: tests that decode videos skip, the train stage skips"
  if [ "$DRY" = 1 ]; then
    local archs=${EPAMX_CUDA_ARCHS:-90-real}
    show "EPAMX_CUDA=1 EPAMX_CUDA_ARCHS=$archs $PYTHON setup.py build_ext --inplace"
    py -c "import epamx; print(epamx.__file__); print(epamx.build_info())" || { NOTE="epamx does not import"; return 1; }
    NOTE="not built (dry run); the checkout's build imports"
    return 0
  fi
  py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { NOTE="torch sees no CUDA GPU"; return 1; }
  local archs=${EPAMX_CUDA_ARCHS:-$(py -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}-real')")}
  # setup.py builds in build/cmake-<python>-torch<version>: a folder of this interpreter and torch alone.
  EPAMX_CUDA=1 EPAMX_CUDA_ARCHS="$archs" MAX_JOBS=${MAX_JOBS:-$(nproc)} run "$PYTHON" setup.py build_ext --inplace \
    || { NOTE="build failed"; return 1; }
  py -c "import epamx; print(epamx.__file__); print(epamx.build_info())" || { NOTE="epamx does not import"; return 1; }
  built_with_cuda || { NOTE="built without CUDA kernels"; return 1; }
  local so; so=$(py -c "import epamx._C as c; print(c.__file__)")
  local sm=${archs%%-*}; sm=${sm%%;*}
  if command -v cuobjdump >/dev/null; then
    echo "+ cuobjdump --list-elf $so"; cuobjdump --list-elf "$so" | tee "$WORK/elf.txt"
    echo "+ cuobjdump --list-ptx $so"; cuobjdump --list-ptx "$so" 2>&1 | tee "$WORK/ptx.txt"
    grep -q "sm_$sm" "$WORK/elf.txt" || { NOTE="no sm_$sm machine code in $so"; return 1; }
    NOTE="CUDA archs $archs; sm_$sm cubins: $(grep -c "sm_$sm" "$WORK/elf.txt"), PTX entries: $(grep -c '\.ptx' "$WORK/ptx.txt")"
  else
    NOTE="CUDA archs $archs (cuobjdump not found: machine code not verified)"
  fi
}

stage_tests() {
  if [ "$DRY" = 1 ]; then
    run "$PYTHON" -m pytest tests -q --collect-only -p no:cacheprovider || { NOTE="collection failed"; return 1; }
    pytest_note "$LOG"; NOTE="collected only (dry run): $NOTE"; return 0
  fi
  need_gpu || return 1
  # shellcheck disable=SC2086
  run "$PYTHON" -m pytest tests -p no:cacheprovider --ignore tests/ops/test_cuda_vs_cpu.py -q -ra $PYTEST_EXTRA
  local rc=$?; pytest_note "$LOG"; return $((rc == 0 ? 0 : 1))
}

stage_cuda_tests() {
  if [ "$DRY" = 1 ]; then
    # Without a GPU the module must skip, with its reason, and nothing else.
    run "$PYTHON" -m pytest tests/ops/test_cuda_vs_cpu.py -q -ra -p no:cacheprovider || { NOTE="failed without a GPU"; return 1; }
    pytest_note "$LOG"; NOTE="without a GPU: $NOTE"; return 0
  fi
  need_gpu || return 1
  # shellcheck disable=SC2086
  run "$PYTHON" -m pytest tests/ops/test_cuda_vs_cpu.py -p no:cacheprovider -q -ra --durations 5 $PYTEST_EXTRA
  local rc=$?; pytest_note "$LOG"; return $((rc == 0 ? 0 : 1))
}

stage_sanitizer() {
  local tools=(memcheck racecheck initcheck synccheck)
  local opts=(--error-exitcode 1 --print-limit 100)
  if [ "$DRY" = 1 ]; then
    for tool in "${tools[@]}"; do
      show "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool ${opts[*]} $PYTHON tools/gpu_driver.py"
    done
    run "$PYTHON" tools/gpu_driver.py --device cpu || { NOTE="the driver fails on the CPU"; return 1; }
    NOTE="commands printed; the driver ran on the CPU"; return 0
  fi
  need_gpu || return 1
  command -v compute-sanitizer >/dev/null || { NOTE="compute-sanitizer not found"; return 1; }
  compute-sanitizer --version | tail -1
  # Check epamx's kernels only where the sanitizer can filter by name: torch's own kernels are not under test.
  if compute-sanitizer --help 2>&1 | grep -q -- "--kernel-name "; then opts+=(--kernel-name kns=epamx); fi
  # The four tools at once, each its own process on the one GPU: the stage takes as long as the slowest.
  local pids=() tool
  for tool in "${tools[@]}"; do
    echo "+ PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool ${opts[*]} $PYTHON tools/gpu_driver.py"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout --kill-after=20 "$LIMIT" compute-sanitizer --tool "$tool" "${opts[@]}" \
      "$PYTHON" tools/gpu_driver.py >"$WORK/sanitizer-$tool.log" 2>&1 &
    pids+=($!)
  done
  local failed=() i rc
  for i in "${!tools[@]}"; do
    wait "${pids[$i]}"; rc=$?
    tool=${tools[$i]}
    echo; echo "==== compute-sanitizer --tool $tool: exit $rc ===="; cat "$WORK/sanitizer-$tool.log"
    # Every tool ends with "... SUMMARY: 0 errors" (racecheck: "0 hazards displayed (0 errors, 0 warnings)").
    if [ $rc -ne 0 ] || ! grep -qE "SUMMARY: 0 errors|\(0 errors, 0 warnings\)" "$WORK/sanitizer-$tool.log" \
       || ! grep -q "match the CPU kernels" "$WORK/sanitizer-$tool.log"; then
      failed+=("$tool")
    fi
  done
  if [ ${#failed[@]} -gt 0 ]; then NOTE="reports or failures: ${failed[*]}"; return 1; fi
  NOTE="memcheck, racecheck, initcheck, synccheck: 0 errors"
}

stage_bench() {
  local args=(bench -k cuda -p no:cacheprovider --bench-time 0.25 --bench-repeats 5)
  if [ "$DRY" = 1 ]; then
    show "$PYTHON" -m pytest "${args[@]}" --bench-table "$OUT/cuda-<gpu>.md"
    run "$PYTHON" -m pytest bench -q --collect-only -p no:cacheprovider || { NOTE="bench collection failed"; return 1; }
    pytest_note "$LOG"; NOTE="collected only (dry run): $NOTE"; return 0
  fi
  need_gpu || return 1
  local table; table="$OUT/cuda-$(gpu_slug).md"
  run "$PYTHON" -m pytest "${args[@]}" --bench-table "$table"
  local rc=$?; pytest_note "$LOG"
  [ -f "$table" ] || { NOTE="no table written: $NOTE"; return 1; }
  NOTE="$(basename "$table") (copy to bench/results/): $NOTE"
  return $((rc == 0 ? 0 : 1))
}

stage_model() {
  if [ "$DRY" = 1 ]; then
    run "$PYTHON" tools/gpu_model.py --device cpu --small --precisions fp32 --ops fused --iters 1 --infer-batch 1 \
      --train-batch 1 \
      --out "$OUT/model.md" \
      || { NOTE="the model script fails on the CPU"; return 1; }
    NOTE="small clips on the CPU (dry run): model.md"; return 0
  fi
  need_gpu || return 1
  run "$PYTHON" tools/gpu_model.py --out "$OUT/model.md" || { NOTE="failed"; return 1; }
  NOTE=$(grep -E '^\| training \| [0-9]+ \| bf16 autocast \| fused' "$OUT/model.md" | awk -F'|' '{print "bf16 training, fused ops:" $6 "clips/s (" $7 "the reference)," $8 "peak"}')
}

stage_train() {
  local run_dir="$WORK/train" cache="$WORK/cache"
  local args=(train --out "$run_dir" "data.cache_dir=\"$cache\"" train.pose_epochs=1 train.rgb_epochs=1 train.fused_epochs=1)
  if ! py -c "import av" 2>/dev/null; then
    NOTE="skipped: PyAV is not importable (carry its wheel in .whl/)"
    [ "$DRY" = 1 ] && show "$PYTHON" -m epamx "${args[@]}" --device cuda
    return 3
  fi
  if [ "$DRY" = 1 ]; then show "$PYTHON" -m epamx "${args[@]}" --device cuda; NOTE="command printed (dry run)"; return 0; fi
  need_gpu || return 1
  rm -rf "$run_dir"  # a fresh run, not a resumed one
  # shellcheck disable=SC2016
  run "$PYTHON" -c 'import sys, torch
from epamx.cli import main
rc = main(sys.argv[1:])
print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
sys.exit(rc)' "${args[@]}" --device cuda || { NOTE="training failed"; return 1; }
  NOTE=$(py - "$run_dir" "$LOG" <<'PY'
import glob, json, os, re, statistics, sys
run_dir, log = sys.argv[1:]
rates = []
for path in glob.glob(os.path.join(run_dir, "**", "log.jsonl"), recursive=True):
    with open(path) as f:
        rates += [r["clips_per_s"] for r in map(json.loads, f) if "clips_per_s" in r]
peak = re.findall(r"peak GPU memory allocated: (\d+ MiB)", open(log).read())
summary = os.path.join(run_dir, "summary.json")
top1 = ""
if os.path.exists(summary):
    text = json.dumps(json.load(open(summary)))
    top1 = " ".join(re.findall(r'"top1": ([0-9.]+)', text)[:3])
print(f"median {statistics.median(rates):.0f} clips/s over {len(rates)} iterations, peak {peak[-1] if peak else '?'}"
      + (f", top-1 {top1}" if top1 else ""))
PY
)
}

# ---- run the stages, then the summary --------------------------------------------------------------------------
RESULTS=()
FAILED=0
say "stages: ${STAGES[*]}$([ "$DRY" = 1 ] && echo ' (dry run)'); logs in $OUT; python: $PYTHON"
for stage in "${STAGES[@]}"; do
  LOG="$OUT/$stage.log"
  NOTE=""
  start=$(date +%s)
  say "$stage ... (log: $LOG)"
  "stage_${stage//-/_}" >"$LOG" 2>&1
  rc=$?
  seconds=$(( $(date +%s) - start ))
  case $rc in
    0) status=PASS ;;
    3) status=SKIP ;;
    *) status=FAIL; FAILED=1
       [ $rc -eq 124 ] || [ $rc -eq 137 ] && NOTE="timed out after ${LIMIT}s; $NOTE"
       echo "---- last lines of $LOG ----"; tail -n 25 "$LOG"; echo "----" ;;
  esac
  say "$stage: $status in ${seconds}s ${NOTE:+($NOTE)}"
  RESULTS+=("| $stage | $status | ${seconds}s | ${NOTE//|//} |")
done

{
  echo "# epamx GPU check$([ "$DRY" = 1 ] && echo ' (dry run: no GPU used)')"
  echo
  py -c "import torch, platform; print(f\"{platform.node()}: torch {torch.__version__}, GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}\")" 2>/dev/null
  if commit=$(git rev-parse --short HEAD 2>/dev/null); then
    git diff --quiet HEAD 2>/dev/null || commit="$commit with local changes"
  else
    commit="not a git checkout"
  fi
  echo "epamx at $commit, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "| stage | result | time | notes |"
  echo "|---|---|---:|---|"
  printf '%s\n' "${RESULTS[@]}"
} >"$OUT/summary.md"
echo
cat "$OUT/summary.md"
exit $FAILED
