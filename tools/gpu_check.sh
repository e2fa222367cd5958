#!/usr/bin/env bash
# The proof of epamx's CUDA kernels on one GPU machine, from this checkout, with no downloads, fitted to a short
# lease: one call of at most 8 minutes that proves the most first, and a second for the rest if time remains.
#
#   bash tools/gpu_check.sh --out DIR                   the quick plan (default): build cuda-tests+sanitizer bench-ops model
#   bash tools/gpu_check.sh --out DIR --plan rest       what the quick plan leaves out: build (kept when done) sanitizer-more
#                                                       train bench tests
#   bash tools/gpu_check.sh --out DIR --plan all        both, for a machine without a lease
#   bash tools/gpu_check.sh --out DIR STAGE ...         these stages, in this order
#   bash tools/gpu_check.sh --dry-run --out DIR         both plans' plumbing on a CPU, each stage's estimated GPU time,
#                                                       the quick plan checked against its budget, DIR's layout checked
# Stages:
#   build          epamx._C with its CUDA kernels as machine code for this GPU only (EPAMX_CUDA_ARCHS=XY-real and
#                  TORCH_CUDA_ARCH_LIST=X.Y, so torch's CMake adds no other -gencode); .whl/ (PyAV) into build/gpu-check/site
#   cuda-tests     tests/ops/test_cuda_vs_cpu.py: every kernel against the CPU kernel; pytest-xdist across the cores,
#                  the int32-boundary tests (marked slow, several GiB each) at the same time in one process of their own
#   sanitizer      compute-sanitizer memcheck over tools/gpu_driver.py (every kernel), racecheck over its
#                  attention_reweight and batch_norm_act calls (the kernels with shared memory), at the same time
#   bench-ops      one short benchmark table: the ops at EPAM-Net's shapes and EPAM-Net's training step (bf16), fused
#                  vs reference: DIR/cuda-<gpu>-ops.md (commit it under bench/results/)
#   model          EPAM-Net clips/s, inference and training steps, fused vs reference ops, bf16 autocast: DIR/model.md
#   sanitizer-more initcheck over the whole driver (unfiltered: torch's own kernels write inputs too), synccheck over
#                  its attention_reweight, batch_norm_act and channel_pool calls (barriers, warp shuffles)
#   train          python -m epamx train, one epoch per stage, on the embedded dataset (needs PyAV)
#   bench          every benchmark on CUDA: DIR/cuda-<gpu>.md
#   tests          the whole test suite with CUDA present (device-parametrised tests on cpu and cuda)
# A name "a+b" in a plan runs stages a and b at the same time.
#
# Time: the whole call has one deadline (--budget SECONDS, default 465 for the quick plan: the device tool's call
# gets timeout_s=480; EPAMX_GPU_CHECK_BUDGET also sets it). A stage starts only while its minimum fits before the
# deadline (else it is skipped, with a note), and runs under min(its cap, the time left).
# DIR gets at most 5 files, none in folders: summary.md (rewritten after every stage), logs.tar.gz (every stage's log,
# re-packed every 30 s and after every stage, so a killed call still returns what finished), and the tables.
# Optional: PYTHON (default python3, else /opt/torch/.venv/bin/python3), EPAMX_CUDA_ARCHS (default: this GPU's, e.g. 90-real), MAX_JOBS.
# Wheels the machine lacks travel in .whl/ (ignored by git); fill it on a machine with network access:
#   python3 -m pip download av --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

# Each stage: estimated GPU-machine seconds, the least time worth starting it with, and its cap. Estimates for the
# H100 lease (16 cores), not yet measured there: build from the 2-core CPU build (~4 min for 25 objects) scaled to
# 16 jobs plus nvcc for one architecture; cuda-tests ~1500 small cases over 12 workers plus their start-up, beside
# 9 int32/int64-boundary tests of ~10 s each; sanitizer ~2000 instrumented launches (racecheck ~1000 of them);
# bench-ops 27 cases of 0.25 s timed rounds; model 4 rows of 5 steps after a warm-up. Replace them with the times
# the first GPU run reports.
declare -A EST=([build]=150 [cuda-tests]=100 [sanitizer]=120 [bench-ops]=110 [model]=45
                [sanitizer-more]=120 [train]=120 [bench]=400 [tests]=300)
declare -A MIN=([build]=90 [cuda-tests]=45 [sanitizer]=60 [bench-ops]=45 [model]=30
                [sanitizer-more]=60 [train]=60 [bench]=60 [tests]=60)
declare -A CAP=([build]=300 [cuda-tests]=200 [sanitizer]=240 [bench-ops]=150 [model]=90
                [sanitizer-more]=240 [train]=240 [bench]=540 [tests]=540)
declare -A PLAN=([quick]="build cuda-tests+sanitizer bench-ops model"
                 [rest]="build sanitizer-more train bench tests"
                 [all]="build cuda-tests+sanitizer bench-ops model sanitizer-more train bench tests")
declare -A FILES=([quick]="summary.md logs.tar.gz cuda-<gpu>-ops.md model.md" [rest]="summary.md logs.tar.gz cuda-<gpu>.md"
                  [all]="summary.md logs.tar.gz cuda-<gpu>-ops.md model.md cuda-<gpu>.md")
declare -A BUDGET_DEFAULT=([quick]=465 [rest]=270 [all]=3000)
RESERVE=15          # seconds kept after the last stage: the summary and the archive
MAX_FILES=8         # what the device tool brings back from $OUT: 8 files, at most two folders deep

OUT=${EPAMX_GPU_CHECK_OUT:-}
DRY=0
PLAN_NAME=quick
BUDGET=${EPAMX_GPU_CHECK_BUDGET:-}
STEPS=()
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=${2:?--out needs a folder}; shift 2 ;;
    --out=*) OUT=${1#--out=}; shift ;;
    --plan) PLAN_NAME=${2:?--plan needs quick, rest or all}; shift 2 ;;
    --quick) PLAN_NAME=quick; shift ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *)
      if [ -n "${EST[$1]:-}" ]; then STEPS+=("$1"); shift
      else echo "gpu_check: unknown stage or option '$1' (stages: ${!EST[*]})" >&2; exit 2; fi ;;
  esac
done
[ -n "$OUT" ] || { echo "gpu_check: give an output folder: --out DIR (or EPAMX_GPU_CHECK_OUT)" >&2; exit 2; }
[ -n "${PLAN[$PLAN_NAME]:-}" ] || { echo "gpu_check: unknown plan '$PLAN_NAME' (quick, rest, all)" >&2; exit 2; }
if [ ${#STEPS[@]} -eq 0 ]; then
  if [ "$DRY" = 1 ]; then read -ra STEPS <<<"${PLAN[all]}"; else read -ra STEPS <<<"${PLAN[$PLAN_NAME]}"; fi
fi
BUDGET=${BUDGET:-${BUDGET_DEFAULT[$PLAN_NAME]}}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
# What an earlier run (or the old layout: a log per stage) left in $OUT would count against the device tool's limits.
rm -f "$OUT"/*.log "$OUT"/summary.md "$OUT"/logs.tar.gz "$OUT"/model.md "$OUT"/cuda-*.md "$OUT"/.logs.*.tmp

# The machine's python3 and torch (the GPU image's venv when python3 on PATH is another); a dry run on a development
# machine uses the checkout's .venv (or, in a git worktree, the main checkout's) when python3 has no torch.
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if ! python3 -c "import torch" 2>/dev/null && [ -x /opt/torch/.venv/bin/python3 ]; then
    PYTHON=/opt/torch/.venv/bin/python3
  elif [ "$DRY" = 1 ] && ! python3 -c "import torch" 2>/dev/null; then
    for venv in "$ROOT/.venv" "$(git rev-parse --path-format=absolute --git-common-dir 2>/dev/null)/../.venv"; do
      if [ -x "$venv/bin/python" ]; then PYTHON=$(cd "$venv" && pwd)/bin/python; break; fi
    done
  fi
fi
"$PYTHON" -c "import torch" 2>/dev/null || { echo "gpu_check: $PYTHON cannot import torch; set PYTHON to one that can" >&2; exit 2; }
WORK="$ROOT/build/gpu-check"          # everything the stages make besides $OUT's files: logs, site, dataset cache, runs
SITE="$WORK/site"
LOGS="$WORK/logs"                     # packed into $OUT/logs.tar.gz
rm -rf "$LOGS" "$WORK/status"
mkdir -p "$LOGS" "$WORK/status"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"
LIMIT=60            # the running stage's timeout, set before each stage
# The tests need PyAV (tests/conftest.py): where it is neither importable nor carried in .whl/ (the build stage
# installs it), they run without it, and those that need it are skipped.
"$PYTHON" -c "import av" 2>/dev/null || compgen -G ".whl/av-*.whl" >/dev/null || export EPAMX_TEST_WITHOUT=av

# ---- helpers ---------------------------------------------------------------------------------------------------
NOTE=""
say() { echo "[gpu_check $(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }
# run CMD...: print it, then run it under the stage's timeout (a program, not a shell function)
run() { echo "+ $*"; timeout --kill-after=10 "$LIMIT" "$@"; }
show() { echo "+ (dry run, not run) $*"; }
py() { "$PYTHON" "$@"; }
has_module() { py -c "import $1" 2>/dev/null; }
gpu_slug() {
  py -c "import re, torch; n = torch.cuda.get_device_name().lower().replace('nvidia', ''); print(re.sub('[^a-z0-9]+', '-', n).strip('-'))"
}
wanted_archs() {
  echo "${EPAMX_CUDA_ARCHS:-$(py -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}-real')")}"
}
# Whether the extension in the checkout has its CUDA kernels (for archs $1, when given).
built_with_cuda() {
  py -c "import epamx, sys; i = epamx.build_info(); sys.exit(0 if i['cuda'] and (not sys.argv[1] or i['cuda_archs'] == sys.argv[1]) else 1)" "${1:-}" 2>/dev/null
}
need_gpu() {
  if ! py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    NOTE="torch sees no CUDA GPU"; return 1
  fi
  if ! built_with_cuda; then NOTE="epamx._C has no CUDA kernels: run the build stage"; return 1; fi
}
# pytest's last summary line ("12 passed, 3 skipped in 4.2s").
pytest_line() {
  grep -E '(passed|failed|skipped|errors?|deselected|no tests ran|collected).* in [0-9.]+s' "$1" | tail -1 \
    | sed -E 's/^=+ *//; s/ *=+$//'
}
xdist_args() { if has_module xdist; then echo "-n $1"; fi; }
timeout_args() { if has_module pytest_timeout; then echo "--timeout $1"; fi; }

# ---- stages: each returns 0 (pass), 1 (fail) or 3 (skipped), and sets NOTE ------------------------------------

stage_build() {
  py -c "import sys, torch; print('python', sys.version.split()[0], 'at', sys.executable); print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  local wheels=()
  shopt -s nullglob; wheels=(.whl/*.whl); shopt -u nullglob
  if [ ${#wheels[@]} -gt 0 ]; then
    if [ "$DRY" = 1 ]; then show "$PYTHON" -m pip install --no-index --no-deps --target "$SITE" "${wheels[@]}"
    elif ! has_module av; then
      run "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" || { NOTE="installing .whl/ failed"; return 1; }
    fi
  else
    echo "no wheels in .whl/: PyAV (av) only if the machine has it"
  fi
  py -c "import av; print('PyAV', av.__version__)" 2>/dev/null || echo "PyAV not importable: tests that decode videos skip, the train stage skips"
  if [ "$DRY" = 1 ]; then
    show "TORCH_CUDA_ARCH_LIST=<X.Y> EPAMX_CUDA=1 EPAMX_CUDA_ARCHS=<XY>-real MAX_JOBS=\$(nproc) $PYTHON setup.py build_ext --inplace"
    py -c "import epamx; print(epamx.__file__); print(epamx.build_info())" || { NOTE="epamx does not import"; return 1; }
    NOTE="not built (dry run); the checkout's build imports"
    return 0
  fi
  py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { NOTE="torch sees no CUDA GPU"; return 1; }
  local archs; archs=$(wanted_archs)
  local sm=${archs%%-*}; sm=${sm%%;*}
  if built_with_cuda "$archs"; then
    NOTE="already built for $archs (kept from an earlier call on this machine)"; return 0
  fi
  # torch's CMake adds -gencode flags for TORCH_CUDA_ARCH_LIST (or every architecture it detects) on top of
  # CMAKE_CUDA_ARCHITECTURES: name this GPU's alone, so an image's list cannot ask nvcc for an architecture it dropped.
  local torch_arch="${sm:0:${#sm}-1}.${sm: -1}"
  echo "+ TORCH_CUDA_ARCH_LIST=$torch_arch (was: ${TORCH_CUDA_ARCH_LIST:-unset})"
  TORCH_CUDA_ARCH_LIST="$torch_arch" EPAMX_CUDA=1 EPAMX_CUDA_ARCHS="$archs" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    run "$PYTHON" setup.py build_ext --inplace || { NOTE="build failed"; return 1; }
  py -c "import epamx; print(epamx.__file__); print(epamx.build_info())" || { NOTE="epamx does not import"; return 1; }
  built_with_cuda || { NOTE="built without CUDA kernels"; return 1; }
  local so; so=$(py -c "import epamx._C as c; print(c.__file__)")
  if command -v cuobjdump >/dev/null; then
    echo "+ cuobjdump --list-elf $so"; cuobjdump --list-elf "$so" | tee "$LOGS/elf.txt"
    echo "+ cuobjdump --list-ptx $so"; cuobjdump --list-ptx "$so" 2>&1 | tee "$LOGS/ptx.txt"
    grep -q "sm_$sm" "$LOGS/elf.txt" || { NOTE="no sm_$sm machine code in $so"; return 1; }
    NOTE="CUDA archs $archs; sm_$sm cubins: $(grep -c "sm_$sm" "$LOGS/elf.txt"), other cubins: $(grep -vc "sm_$sm" "$LOGS/elf.txt"), PTX entries: $(grep -c '\.ptx' "$LOGS/ptx.txt")"
  else
    NOTE="CUDA archs $archs (cuobjdump not found: machine code not verified)"
  fi
}

stage_cuda_tests() {
  local module=tests/ops/test_cuda_vs_cpu.py
  if [ "$DRY" = 1 ]; then
    # Without a GPU the module must skip, with its reason, and nothing else.
    run "$PYTHON" -m pytest "$module" -q -ra -p no:cacheprovider || { NOTE="failed without a GPU"; return 1; }
    show "$PYTHON" -m pytest "$module" -m slow -q -ra -p no:cacheprovider "&" \
         "$PYTHON" -m pytest "$module" -m '"not slow"' -q -ra -p no:cacheprovider -n 12
    NOTE="without a GPU: $(pytest_line "$LOG")"; return 0
  fi
  need_gpu || return 1
  # The int32-boundary tests hold 8-16 GiB each: one at a time, beside the many small ones spread over workers.
  # shellcheck disable=SC2046
  run "$PYTHON" -m pytest "$module" -m slow -q -ra -p no:cacheprovider --durations 5 $(timeout_args 120) \
    >"$LOGS/cuda-tests-int32.log" 2>&1 &
  local slow_pid=$!
  # shellcheck disable=SC2046
  run "$PYTHON" -m pytest "$module" -m "not slow" -q -ra -p no:cacheprovider --durations 5 $(xdist_args 12) $(timeout_args 60)
  local rc=$? main; main=$(pytest_line "$LOG")
  wait $slow_pid; local slow_rc=$?
  echo; echo "==== the int32-boundary tests (marked slow): exit $slow_rc ===="; cat "$LOGS/cuda-tests-int32.log"
  NOTE="$main; int32 boundary: $(pytest_line "$LOGS/cuda-tests-int32.log")"
  [ $rc -eq 0 ] && [ $slow_rc -eq 0 ]
}

# sanitize TOOL FILTER DRIVER_ARGS...: compute-sanitizer TOOL over the driver, log in $LOGS/sanitizer-TOOL.log.
# FILTER "epamx" instruments epamx's kernels only; "" every kernel (initcheck: torch's kernels write what ours read).
# CUDA API errors torch raises and handles itself (probing features) are not kernel errors: not reported, and so not
# counted by --error-exitcode.
sanitize() {
  local tool=$1 filter=$2; shift 2
  local opts=(--tool "$tool" --error-exitcode 1 --print-limit 100)
  if [ "$DRY" != 1 ]; then
    compute-sanitizer --help 2>&1 | grep -q -- "--report-api-errors" && opts+=(--report-api-errors no)
    [ -n "$filter" ] && compute-sanitizer --help 2>&1 | grep -q -- "--kernel-name " && opts+=(--kernel-name "kns=$filter")
  else
    opts+=(--report-api-errors no); [ -n "$filter" ] && opts+=(--kernel-name "kns=$filter")
  fi
  local cmd=(compute-sanitizer "${opts[@]}" "$PYTHON" tools/gpu_driver.py "$@")
  if [ "$DRY" = 1 ]; then show "PYTORCH_NO_CUDA_MEMORY_CACHING=1 ${cmd[*]}"; return 0; fi
  echo "+ PYTORCH_NO_CUDA_MEMORY_CACHING=1 ${cmd[*]}  (log: sanitizer-$tool.log)"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout --kill-after=10 "$LIMIT" "${cmd[@]}" >"$LOGS/sanitizer-$tool.log" 2>&1
}

# sanitizer_verdict TOOL...: which tool flagged which kernel, into $WORK/status/sanitizer-findings-<stage>.md and NOTE;
# fails on a report in an epamx kernel, a report no kernel is named for, or a driver that did not finish.
sanitizer_verdict() {
  local findings="$WORK/status/findings-$STAGE.md"
  NOTE=$(py - "$LOGS" "$findings" "$@" <<'PY'
import collections, os, re, sys
logs, findings, tools = sys.argv[1], sys.argv[2], sys.argv[3:]
# A report's first line (continuation lines are indented; the closing SUMMARY lines are counts, not reports).
header = re.compile(r"^========= (?!.*SUMMARY)(Invalid|Uninitialized|Error|Warning|Barrier|Race|Misaligned|Out-of-range|"
                    r"Program hit|Malloc|Cuda|Host API|Divergent|Potential|\S.*[Hh]azard)")
at = re.compile(r"\bat (?:void )?(.+?)(?:\(|\+0x| in |$)")
rows, verdict, failed = [], [], False
for tool in tools:
    path = os.path.join(logs, f"sanitizer-{tool}.log")
    text = open(path, errors="replace").read() if os.path.exists(path) else ""
    lines = text.replace("(anonymous namespace)::", "").splitlines()
    kernels = collections.Counter()
    for i, line in enumerate(lines):
        if not header.match(line):
            continue
        if line.startswith("========= Program hit"):  # a failed CUDA API call, not a kernel's error
            api = re.search(r"CUDA API call to (\w+)", line)
            kernels[f"(CUDA API error: {api.group(1) if api else 'unknown call'})"] += 1
            continue
        name = None
        for follow in lines[i:i + 4]:
            m = at.search(follow)
            if m and m.group(1).strip():
                name = re.sub(r"<.*", "", m.group(1).strip())
                break
        kernels[name or "(no kernel named)"] += 1
    finished = "match the CPU kernels" in text
    summary = re.findall(r"(ERROR SUMMARY: \d+ errors?|\(\d+ errors?, \d+ warnings?\))", text)
    ours = {k: n for k, n in kernels.items() if "epamx::" in k or k == "(no kernel named)"}
    others = {k: n for k, n in kernels.items() if k not in ours}
    for k, n in kernels.most_common():
        rows.append(f"| {tool} | `{k}` | {n} | {'epamx: a bug to fix' if k in ours else 'not epamx: review'} |")
    if not finished:
        rows.append(f"| {tool} | (the driver) | - | did not finish: see logs/sanitizer-{tool}.log |")
    failed |= bool(ours) or not finished
    verdict.append(f"{tool}: " + ("driver did not finish" if not finished else
                                  f"{sum(ours.values())} in epamx, {sum(others.values())} elsewhere"
                                  + (f" ({summary[-1]})" if summary else "")))
with open(findings, "w") as f:
    f.write("| tool | kernel | reports | verdict |\n|---|---|---:|---|\n")
    f.write("\n".join(rows or [f"| {', '.join(tools)} | - | 0 | no reports |"]) + "\n")
print("; ".join(verdict))
sys.exit(1 if failed else 0)
PY
)
}

# The ops whose kernels share memory between threads (attention_reweight's per-frame block sum, batch_norm_act's lane
# trees: racecheck), and those with barriers or warp shuffles (those two, and channel_pool's channels-last teams:
# synccheck).
SHARED_MEMORY_OPS=attention_reweight,batch_norm_act
BARRIER_OPS=attention_reweight,batch_norm_act,channel_pool

stage_sanitizer() {
  if [ "$DRY" = 1 ]; then
    sanitize memcheck epamx; sanitize racecheck epamx --ops "$SHARED_MEMORY_OPS"
    run "$PYTHON" tools/gpu_driver.py --device cpu || { NOTE="the driver fails on the CPU"; return 1; }
    NOTE="commands printed; the driver ran on the CPU"; return 0
  fi
  need_gpu || return 1
  command -v compute-sanitizer >/dev/null || { NOTE="compute-sanitizer not found"; return 1; }
  compute-sanitizer --version | tail -1
  sanitize memcheck epamx & local p1=$!
  sanitize racecheck epamx --ops "$SHARED_MEMORY_OPS" & local p2=$!
  wait $p1; echo "memcheck exit $?"; wait $p2; echo "racecheck exit $?"
  for tool in memcheck racecheck; do echo; echo "==== $tool (last 40 lines) ===="; tail -n 40 "$LOGS/sanitizer-$tool.log"; done
  sanitizer_verdict memcheck racecheck
}

stage_sanitizer_more() {
  if [ "$DRY" = 1 ]; then
    sanitize initcheck ""; sanitize synccheck epamx --ops "$BARRIER_OPS"
    NOTE="commands printed (the driver ran in the sanitizer stage)"; return 0
  fi
  need_gpu || return 1
  command -v compute-sanitizer >/dev/null || { NOTE="compute-sanitizer not found"; return 1; }
  sanitize initcheck "" & local p1=$!
  sanitize synccheck epamx --ops "$BARRIER_OPS" & local p2=$!
  wait $p1; echo "initcheck exit $?"; wait $p2; echo "synccheck exit $?"
  for tool in initcheck synccheck; do echo; echo "==== $tool (last 40 lines) ===="; tail -n 40 "$LOGS/sanitizer-$tool.log"; done
  sanitizer_verdict initcheck synccheck
}

bench_table() {  # bench_table NAME ARGS...: pytest bench ARGS..., the table at $OUT/NAME
  local table="$OUT/$1"; shift
  run "$PYTHON" -m pytest bench -p no:cacheprovider --bench-time 0.25 --bench-repeats 5 "$@" --bench-table "$table"
  local rc=$?
  [ -f "$table" ] || { NOTE="no table written: $(pytest_line "$LOG")"; return 1; }
  NOTE="$(basename "$table") (commit it as bench/results/$(basename "$table")): $(pytest_line "$LOG")"
  return $((rc == 0 ? 0 : 1))
}

# EPAM-Net's shapes only: the ops (temporal shift's stages, the attention at batch 12, the ReLU batch norm of the
# X-ShiftNet stages in both layouts) and the training step.
BENCH_OPS_K="cuda and (test_temporal_shift or test_attention_reweight or test_channel_pool or (test_batch_norm_act and relu) or test_epamnet_training_step) and not large"

stage_bench_ops() {
  if [ "$DRY" = 1 ]; then
    show "$PYTHON" -m pytest bench -k "'$BENCH_OPS_K'" --bench-table "$OUT/cuda-<gpu>-ops.md"
    run "$PYTHON" -m pytest bench -q --collect-only -p no:cacheprovider -k "${BENCH_OPS_K/cuda and /}" \
      || { NOTE="bench collection failed"; return 1; }
    NOTE="collected only, their CPU twins (dry run): $(pytest_line "$LOG")"; return 0
  fi
  need_gpu || return 1
  bench_table "cuda-$(gpu_slug)-ops.md" -k "$BENCH_OPS_K"
}

# The full benchmarks, one file at a time (most wanted first), each table appended to $OUT/cuda-<gpu>.md as its file
# ends: the deadline or a timeout then costs the file running, not the whole table.
BENCH_FILES=(bench_attention bench_blocks bench_temporal_shift bench_epamnet bench_render_heatmaps bench_train bench_data)

stage_bench() {
  if [ "$DRY" = 1 ]; then
    for f in "${BENCH_FILES[@]}"; do show "$PYTHON" -m pytest "bench/$f.py" -k cuda --bench-table "<appended to $OUT/cuda-<gpu>.md>"; done
    NOTE="commands printed (bench-ops collected the files)"; return 0
  fi
  need_gpu || return 1
  local table; table="$OUT/cuda-$(gpu_slug).md"
  local f left tables=() failed=() rc=0
  rm -f "$table"
  for f in "${BENCH_FILES[@]}"; do
    left=$((DEADLINE - RESERVE - $(date +%s)))
    if [ "$left" -lt 30 ]; then echo "deadline: ${left}s left, $f and the rest not run"; break; fi
    LIMIT=$left
    run "$PYTHON" -m pytest "bench/$f.py" -p no:cacheprovider --bench-time 0.25 --bench-repeats 5 -k cuda \
      --bench-table "$WORK/bench-$f.md"
    case $? in 0|5) ;; *) failed+=("$f"); rc=1 ;; esac   # 5: no CUDA case in that file
    if [ -f "$WORK/bench-$f.md" ]; then
      { echo "## bench/$f.py"; echo; cat "$WORK/bench-$f.md"; echo; } >>"$table"; rm -f "$WORK/bench-$f.md"; tables+=("$f")
    fi
  done
  NOTE="$(basename "$table") (commit it as bench/results/$(basename "$table")): ${tables[*]:-none}${failed[*]:+; failed: ${failed[*]}}"
  return $rc
}

stage_model() {
  if [ "$DRY" = 1 ]; then
    run "$PYTHON" tools/gpu_model.py --device cpu --small --precisions fp32 --ops fused --iters 1 --infer-batch 1 \
      --train-batch 1 --out "$OUT/model.md" || { NOTE="the model script fails on the CPU"; return 1; }
    NOTE="small clips on the CPU (dry run): model.md"; return 0
  fi
  need_gpu || return 1
  run "$PYTHON" tools/gpu_model.py --precisions bf16 --iters 5 --out "$OUT/model.md" || { NOTE="failed"; return 1; }
  NOTE=$(grep -E '^\| training \| [0-9]+ \| bf16 autocast \| fused' "$OUT/model.md" | awk -F'|' '{print "bf16 training, fused ops:" $6 "clips/s (" $7 "the reference)," $8 "peak"}')
}

stage_tests() {
  if [ "$DRY" = 1 ]; then
    run "$PYTHON" -m pytest tests -q --collect-only -p no:cacheprovider || { NOTE="collection failed"; return 1; }
    NOTE="collected only (dry run): $(pytest_line "$LOG")"; return 0
  fi
  need_gpu || return 1
  # (the CUDA-vs-CPU tests ran in cuda-tests; the CUDA emulator's, CPU-only and minutes long, run in CI)
  # shellcheck disable=SC2046
  run "$PYTHON" -m pytest tests -p no:cacheprovider --ignore tests/ops/test_cuda_vs_cpu.py \
    --ignore tests/ops/test_cuda_emulated.py -q -ra $(xdist_args 16)
  local rc=$?; NOTE=$(pytest_line "$LOG"); return $((rc == 0 ? 0 : 1))
}

stage_train() {
  local run_dir="$WORK/train" cache="$WORK/cache"
  local args=(train --out "$run_dir" "data.cache_dir=\"$cache\"" stages.pose.epochs=1 stages.rgb.epochs=1 stages.epamnet.epochs=1)
  if ! has_module av; then
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

# ---- the plan: stages run under one deadline, results written as each ends -------------------------------------

# pack: $OUT/logs.tar.gz from $LOGS, replaced atomically; logs over 4 MiB keep their first and last 1 MiB.
pack() {
  local tmp="$WORK/pack.$BASHPID" f
  rm -rf "$tmp"; mkdir -p "$tmp/logs"
  for f in "$LOGS"/*; do
    [ -f "$f" ] || continue
    if [ "$(stat -c %s "$f")" -gt $((4 << 20)) ]; then
      { head -c $((1 << 20)) "$f"; printf '\n[... cut by gpu_check: the middle of this log ...]\n'; tail -c $((1 << 20)) "$f"; } >"$tmp/logs/${f##*/}"
    else
      cp "$f" "$tmp/logs/"
    fi
  done
  # Packed outside $OUT, then renamed inside it: $OUT never holds half an archive under its final name.
  tar -czf "$tmp/logs.tar.gz" -C "$tmp" logs 2>/dev/null && cp "$tmp/logs.tar.gz" "$OUT/.logs.$BASHPID.tmp" \
    && mv -f "$OUT/.logs.$BASHPID.tmp" "$OUT/logs.tar.gz"
  rm -rf "$tmp"
}

# check_layout: $OUT within what the device tool brings back (files, depth); prints the layout.
check_layout() {
  local files deep
  files=$(find "$OUT" -type f | wc -l)
  deep=$(find "$OUT" -mindepth 4 | wc -l)   # $OUT/a/b/file is depth 3
  echo "layout of $OUT ($files files, at most $MAX_FILES; nothing deeper than two folders):"
  (cd "$OUT" && find . -type f -printf '  %P  %s bytes\n' | sort)
  [ "$files" -le "$MAX_FILES" ] && [ "$deep" -eq 0 ] && ! find "$OUT" -type l | grep -q .
}

write_summary() {
  {
    echo "# epamx GPU check$([ "$DRY" = 1 ] && echo ' (dry run: no GPU used)')"
    echo
    echo "$MACHINE"
    echo "epamx at $COMMIT, $(date -u +%Y-%m-%dT%H:%MZ); plan: ${STEPS[*]}; budget ${BUDGET}s, used $(( $(date +%s) - START ))s"
    echo
    echo "| stage | result | time | estimate | notes |"
    echo "|---|---|---:|---:|---|"
    local s
    for s in $(printf '%s\n' "${STEPS[@]}" | tr '+' '\n'); do
      if [ -f "$WORK/status/$s" ]; then cat "$WORK/status/$s"
      else echo "| $s | not run (yet) | | ${EST[$s]}s | |"; fi
    done
    for s in sanitizer sanitizer-more; do
      if [ -f "$WORK/status/findings-$s.md" ]; then
        echo; echo "Sanitizer reports of the $s stage, by tool and kernel:"; echo; cat "$WORK/status/findings-$s.md"
      fi
    done
    echo
    echo "Logs: logs.tar.gz (logs/<stage>.log; logs/sanitizer-<tool>.log; logs/cuda-tests-int32.log; logs/elf.txt)."
  } >"$OUT/summary.md.tmp" && mv -f "$OUT/summary.md.tmp" "$OUT/summary.md"
}

# run_stage NAME: one stage under the deadline; its status row in $WORK/status/NAME.
run_stage() {
  STAGE=$1
  LOG="$LOGS/$STAGE.log"
  NOTE=""
  local left=$((DEADLINE - RESERVE - $(date +%s))) start rc status seconds
  if [ "$DRY" != 1 ] && [ "$left" -lt "${MIN[$STAGE]}" ]; then
    echo "| $STAGE | SKIP | 0s | ${EST[$STAGE]}s | deadline: ${left}s left, needs at least ${MIN[$STAGE]}s |" >"$WORK/status/$STAGE"
    say "$STAGE: SKIP (deadline: ${left}s left, needs at least ${MIN[$STAGE]}s)"
    return 0
  fi
  LIMIT=$(( left < CAP[$STAGE] ? left : CAP[$STAGE] ))
  [ "$DRY" = 1 ] && LIMIT=${CAP[$STAGE]}
  start=$(date +%s)
  say "$STAGE ... (timeout ${LIMIT}s, estimate ${EST[$STAGE]}s; log: logs/$STAGE.log)"
  "stage_${STAGE//-/_}" >"$LOG" 2>&1
  rc=$?
  seconds=$(( $(date +%s) - start ))
  case $rc in
    0) status=PASS ;;
    3) status=SKIP ;;
    *) status=FAIL
       [ $rc -eq 124 ] || [ $rc -eq 137 ] || [ "$seconds" -ge "$LIMIT" ] && NOTE="timed out after ${LIMIT}s; $NOTE"
       echo "---- last lines of logs/$STAGE.log ----"; tail -n 25 "$LOG"; echo "----" ;;
  esac
  say "$STAGE: $status in ${seconds}s ${NOTE:+($NOTE)}"
  echo "| $STAGE | $status | ${seconds}s | ${EST[$STAGE]}s | ${NOTE//|//} |" >"$WORK/status/$STAGE"
}

# The budget's check, before anything runs: the plan's estimates (stages joined by + overlap: their maximum).
estimate_plan() {
  local plan=$1 step total=0 s longest
  for step in ${PLAN[$plan]}; do
    longest=0
    for s in ${step//+/ }; do [ "${EST[$s]}" -gt "$longest" ] && longest=${EST[$s]}; done
    total=$((total + longest))
  done
  echo "$total"
}

MACHINE=$(py -c "import torch, platform; print(platform.node() + ': torch ' + torch.__version__ + ', GPU ' + (torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'))" 2>/dev/null)
if COMMIT=$(git rev-parse --short HEAD 2>/dev/null); then
  git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT with local changes"
else
  COMMIT="not a git checkout"
fi
say "plan: ${STEPS[*]}$([ "$DRY" = 1 ] && echo ' (dry run)'); budget ${BUDGET}s; \$OUT $OUT; logs in $LOGS; python: $PYTHON"
FAILED=0
if [ "$DRY" = 1 ]; then
  echo "Estimated GPU time per stage (H100, stated estimates; the GPU run's summary gives the measured ones):"
  for plan in quick rest; do
    total=$(estimate_plan $plan)
    echo "  plan $plan (budget ${BUDGET_DEFAULT[$plan]}s, $RESERVE s reserved):"
    for step in ${PLAN[$plan]}; do
      for s in ${step//+/ }; do printf '    %-15s ~%4ss  (min %ss, cap %ss)%s\n' "$s" "${EST[$s]}" "${MIN[$s]}" "${CAP[$s]}" \
        "$([ "$s" != "$step" ] && echo "  at the same time as the rest of $step")"; done
    done
    echo "    total ~${total}s; \$OUT gets ${FILES[$plan]} (at most $MAX_FILES files, no folders)"
    [ "$(wc -w <<<"${FILES[$plan]}")" -le "$MAX_FILES" ] || { echo "gpu_check: plan $plan writes too many files" >&2; FAILED=1; }
  done
  quick_total=$(estimate_plan quick)
  if [ $((quick_total + RESERVE)) -gt "${BUDGET_DEFAULT[quick]}" ]; then
    echo "gpu_check: the quick plan's estimates (${quick_total}s + ${RESERVE}s) exceed its budget (${BUDGET_DEFAULT[quick]}s)" >&2
    FAILED=1
  fi
  echo "  (the rest plan's stages past its budget are skipped by its deadline, lowest value last)"
fi
# Re-pack the logs every 30 s, so that a call killed mid-stage still returns that stage's log so far.
( while sleep 30; do pack; done ) & PACKER=$!
trap 'kill $PACKER 2>/dev/null' EXIT
write_summary
for step in "${STEPS[@]}"; do
  if [[ $step == *+* ]]; then
    pids=()
    for s in ${step//+/ }; do run_stage "$s" & pids+=($!); done
    wait "${pids[@]}"
  else
    run_stage "$step"
  fi
  for s in ${step//+/ }; do grep -q "| FAIL |" "$WORK/status/$s" 2>/dev/null && FAILED=1; done
  write_summary; pack
done
kill $PACKER 2>/dev/null; wait $PACKER 2>/dev/null
pack; write_summary
echo
cat "$OUT/summary.md"
if ! check_layout; then echo "gpu_check: $OUT is over the device tool's limits ($MAX_FILES files, two folders)" >&2; FAILED=1; fi
exit $FAILED
