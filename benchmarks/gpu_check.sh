#!/usr/bin/env bash
# GPU session check for kd_kernels (docs/BENCHMARKS.md), sized so that a lent GPU machine finishes it in ONE
# device call (one command may run 10 minutes, a task has 15 minutes of device time in all). Stages, in this
# order, each under `timeout` with its own budget (seconds; env GC_BUDGET_<STAGE> overrides, the defaults add up
# to 540 s, the estimates printed in plan.txt to about 415 s):
#
#   preflight  15  Python.h, libcudart_static.a and nvcc where CMake (setup.py) will look; stops if one is missing
#   build     180  pip install -e . with KD_KERNELS_CUDA=1 (KD_KERNELS_CUDA_ARCHS, default 90); stops if it fails
#   tests     130  pytest -k "not slow": tests/test_cuda_backend.py, test_triton_backend.py (compiled Triton),
#                  test_fused_linear.py, test_fused_linear_rows.py
#   bench      80  benchmarks/run.py --device cuda --quick --no-plots $BENCH_ARGS (one error row per failing case;
#                  results.csv is rewritten after every case, so a timed-out run still leaves its rows)
#   memcheck   60  compute-sanitizer --tool memcheck on a small case (every divergence, resident/stream/cluster)
#   racecheck  45  compute-sanitizer --tool racecheck on a smaller case
#   synccheck  30  compute-sanitizer --tool synccheck on the smaller case
#
# The sanitizers run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (every tensor its own cudaMalloc, so an out-of-bounds
# access is seen). A stage that fails or times out is recorded in summary.txt and the next stage runs, except
# after a failed preflight or build. Exit status: 0 when every stage passed, 1 otherwise.
# $OUT (default .bench_out/gpu_check) receives at most 8 files: plan.txt, summary.txt, nvidia_smi.txt,
# build.log (preflight + build), tests.log, bench.csv, bench.md, sanitizer.log (the three tools).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [all|preflight|build|tests|bench|sanitize]    (default: all)
#
# Through the device tool, one call:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# `--dry-run` needs no GPU and no nvcc (tests/test_gpu_check.py runs it, ~20-40 s on 2 cores): preflight only
# reports, the build stage imports the in-tree module instead of building, the test selection is collected
# (pytest --collect-only, which validates the -k expression), run.py runs on the CPU with one case and two
# providers, and the sanitizers' Python case runs on CPU tensors; it writes the same file set and the plan.
# Liger-Kernel is not installed on the GPU machine: to include it, fetch its pure-Python wheel here first
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel
# and carry ".whl"; this script installs any wheels it finds there into /tmp/site.
# Env: KD_KERNELS_CUDA_ARCHS (default 90), MAX_JOBS (default 16), PYTHON (default python3), BENCH_ARGS (extra
# run.py arguments, e.g. "--ops kd_logits --providers kd_kernels torch"), GC_BUDGET_PREFLIGHT, GC_BUDGET_BUILD,
# GC_BUDGET_TESTS, GC_BUDGET_BENCH, GC_BUDGET_MEMCHECK, GC_BUDGET_RACECHECK, GC_BUDGET_SYNCCHECK.
set -uo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
export PY
export OUT="${OUT:-$PWD/.bench_out/gpu_check}"

STAGES=(preflight build tests bench memcheck racecheck synccheck)
declare -A BUDGET=([preflight]="${GC_BUDGET_PREFLIGHT:-15}" [build]="${GC_BUDGET_BUILD:-180}"
  [tests]="${GC_BUDGET_TESTS:-130}" [bench]="${GC_BUDGET_BENCH:-80}" [memcheck]="${GC_BUDGET_MEMCHECK:-60}"
  [racecheck]="${GC_BUDGET_RACECHECK:-45}" [synccheck]="${GC_BUDGET_SYNCCHECK:-30}")
# what a real run is expected to take (H200, 16 cores), for the plan
declare -A ESTIMATE=([preflight]=5 [build]=150 [tests]=100 [bench]=70 [memcheck]=40 [racecheck]=30 [synccheck]=20)
TEST_FILES="tests/test_cuda_backend.py tests/test_triton_backend.py tests/test_fused_linear.py tests/test_fused_linear_rows.py"
TEST_K="not slow"
BENCH_REAL="benchmarks/run.py --device cuda --quick --no-plots ${BENCH_ARGS:-}"
BENCH_DRY="benchmarks/run.py --device cpu --quick --no-plots --threads 1 --ops kd_logits --divergences forward_kl --providers kd_kernels torch"
SAN_ENV="PYTORCH_NO_CUDA_MEMORY_CACHING=1"

command_of() {  # the command a stage runs (real run), for the plan
  case "$1" in
    preflight) echo "look for Python.h (sysconfig include), libcudart_static.a and nvcc (CUDACXX, CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda)" ;;
    build) echo "KD_KERNELS_CUDA=1 KD_KERNELS_CUDA_ARCHS=${KD_KERNELS_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps -v -e ." ;;
    tests) echo "$PY -m pytest -q -rs -k \"$TEST_K\" -p no:cacheprovider $TEST_FILES" ;;
    bench) echo "$PY $BENCH_REAL --out <tmp>  (-> bench.csv, bench.md)" ;;
    memcheck) echo "$SAN_ENV compute-sanitizer --tool memcheck --error-exitcode 3 $PY <sanitize case> cuda full" ;;
    racecheck) echo "$SAN_ENV compute-sanitizer --tool racecheck --error-exitcode 3 $PY <sanitize case> cuda small" ;;
    synccheck) echo "$SAN_ENV compute-sanitizer --tool synccheck --error-exitcode 3 $PY <sanitize case> cuda small" ;;
  esac
}

note() { echo "== $*" | tee -a "$OUT/summary.txt"; }

# --------------------------------------------------------------------------------------- nvcc / CUDA lookup

find_nvcc() {  # the same order as setup.py's _find_nvcc
  local c
  for c in "${CUDACXX:-}" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "${CUDA_PATH:+$CUDA_PATH/bin/nvcc}" \
    "$(command -v nvcc 2>/dev/null)" /usr/local/cuda/bin/nvcc; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}

find_cudart_static() {  # where CMake's FindCUDAToolkit looks, next to the nvcc it uses
  local nvcc="$1" root d
  root="$(cd "$(dirname "$(readlink -f "$nvcc")")/.." 2>/dev/null && pwd)"
  for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "$root" /usr/local/cuda; do
    [ -n "$d" ] || continue
    for f in "$d/lib64/libcudart_static.a" "$d/lib/libcudart_static.a" \
      "$d"/targets/*/lib/libcudart_static.a; do
      if [ -f "$f" ]; then echo "$f"; return 0; fi
    done
  done
  return 1
}

# ------------------------------------------------------------------------------------------------ the stages

stage_preflight() {
  local missing=0 inc nvcc cudart
  inc="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null)"
  if [ -n "$inc" ] && [ -f "$inc/Python.h" ]; then echo "Python.h: $inc/Python.h"
  else echo "Python.h: MISSING (looked in '${inc:-?}'; install the python3-dev headers)"; missing=1; fi
  if nvcc="$(find_nvcc)"; then
    echo "nvcc: $nvcc ($("$nvcc" --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'version unknown'))"
    if cudart="$(find_cudart_static "$nvcc")"; then echo "libcudart_static.a: $cudart"
    else echo "libcudart_static.a: MISSING (not under the toolkit of $nvcc, CUDA_HOME or /usr/local/cuda)"; missing=1; fi
  else
    echo "nvcc: MISSING (CUDACXX, CUDA_HOME/bin, CUDA_PATH/bin, PATH, /usr/local/cuda/bin)"
    echo "libcudart_static.a: not looked for (no toolkit)"
    missing=1
  fi
  echo "cmake: $("$PY" -c 'import cmake; print(cmake.CMAKE_BIN_DIR)' 2>/dev/null || command -v cmake || echo MISSING)"
  if [ $missing -ne 0 ]; then
    if [ "$DRY" = 1 ]; then echo "preflight: something is missing (fine for --dry-run, which builds nothing)"; return 0; fi
    echo "preflight FAILED: the CUDA build cannot work here, stopping before the build"
    return 1
  fi
  echo "preflight ok"
}

stage_build() {
  if [ "$DRY" = 1 ]; then
    echo "dry run, not run: $(command_of build)"
    "$PY" -c "import kd_kernels, json; print(json.dumps(kd_kernels.build_info())); \
print('backends on cpu:', kd_kernels.available_backends('cpu'))"
    return $?
  fi
  KD_KERNELS_CUDA=1 KD_KERNELS_CUDA_ARCHS="${KD_KERNELS_CUDA_ARCHS:-90}" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" -m pip install --no-build-isolation --no-deps -v -e . || return 1
  "$PY" -c "import kd_kernels, json; i = kd_kernels.build_info(); print(json.dumps(i)); \
assert i['cuda'], 'built without CUDA'; print('backends on cuda:', kd_kernels.available_backends('cuda'))"
}

stage_tests() {
  # shellcheck disable=SC2086
  if [ "$DRY" = 1 ]; then
    "$PY" -m pytest --collect-only -q -k "$TEST_K" -p no:cacheprovider $TEST_FILES
  else
    TRITON_INTERPRET=0 "$PY" -m pytest -q -rs -k "$TEST_K" -p no:cacheprovider $TEST_FILES
  fi
}

stage_bench() {
  local cmd="$BENCH_REAL"
  [ "$DRY" = 1 ] && cmd="$BENCH_DRY"
  # shellcheck disable=SC2086
  TRITON_INTERPRET=0 "$PY" $cmd --out "$WORK/bench"
}

write_sanitize_case() {
  cat >"$WORK/kd_sanitize.py" <<'EOF'
"""Small loss_grad calls for compute-sanitizer: argv[1] device (cuda, or cpu for --dry-run), argv[2] full|small."""
import os, sys
import torch
from kd_kernels._backends import get_backend
from kd_kernels._spec import Divergence, KDSpec
dev, size = sys.argv[1], sys.argv[2]
backend = get_backend(dev)
paths = ("auto", "stream", "cluster:2") if size == "full" else ("auto", "stream")
divs = list(Divergence) if size == "full" else [Divergence.FORWARD_KL, Divergence.JSD, Divergence.RENYI]
dts = ((torch.bfloat16, torch.float32), (torch.float16, torch.float16))
calls = 0
for path in paths if dev == "cuda" else ("cpu",):
    os.environ["KD_KERNELS_CUDA_PATH"] = path
    for d in divs:
        for sd, td in dts if size == "full" else dts[:1]:
            s = torch.randn(5, 1031, device=dev).to(sd)
            t = torch.randn(5, 1031, device=dev).to(td)
            w = torch.tensor([1.0, 0.0, 0.5, 1.0, 2.0], device=dev)
            g = torch.empty_like(s)
            spec = KDSpec(d, 0.3 if d >= 2 else 0.0, 1.0)
            backend.loss_grad(s, t, w, spec, g)
            backend.loss_grad(s, t, w, spec, s)  # in place
            calls += 2
if dev == "cuda":
    torch.cuda.synchronize()
print(f"sanitize case done: {calls} loss_grad calls on {dev} ({size})")
EOF
}

stage_sanitizer() {  # $1 = memcheck|racecheck|synccheck
  local tool="$1" size=small
  [ "$tool" = memcheck ] && size=full
  echo "---- compute-sanitizer --tool $tool ($size case)"
  if [ "$DRY" = 1 ]; then
    echo "dry run, not run: $(command_of "$tool"); the same Python case on CPU tensors:"
    "$PY" "$WORK/kd_sanitize.py" cpu "$size"
    return $?
  fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 3 \
    "$PY" "$WORK/kd_sanitize.py" cuda "$size"
}

# Internal: one stage in its own process, so that `timeout` can kill it and everything it started.
if [ "${1:-}" = "__stage" ]; then
  case "$2" in
    preflight) stage_preflight ;;
    build) stage_build ;;
    tests) stage_tests ;;
    bench) stage_bench ;;
    memcheck | racecheck | synccheck) stage_sanitizer "$2" ;;
    *) echo "unknown internal stage $2" >&2; exit 2 ;;
  esac
  exit $?
fi

# ------------------------------------------------------------------------------------------------ the driver

DRY=0
SEL=all
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    all | preflight | build | tests | test | bench | sanitize) SEL="$a" ;;
    -h | --help) sed -n '2,40p' "$SELF"; exit 0 ;;
    *) echo "unknown argument $a; use [--dry-run] [all|preflight|build|tests|bench|sanitize]" >&2; exit 2 ;;
  esac
done
export DRY
case "$SEL" in
  all) RUN=("${STAGES[@]}") ;;
  test | tests) RUN=(tests) ;;
  sanitize) RUN=(memcheck racecheck synccheck) ;;
  *) RUN=("$SEL") ;;
esac

mkdir -p "$OUT"
rm -f "$OUT"/{plan.txt,summary.txt,nvidia_smi.txt,build.log,tests.log,bench.csv,bench.md,sanitizer.log}
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kd_gpu_check.XXXXXX")"
export WORK
trap 'rm -rf "$WORK"' EXIT
write_sanitize_case

log_of() {
  case "$1" in
    preflight | build) echo build.log ;;
    tests) echo tests.log ;;
    bench) echo summary.txt ;;
    *) echo sanitizer.log ;;
  esac
}

# The plan: stage, budget, estimate, command.
{
  echo "gpu_check.sh plan ($([ "$DRY" = 1 ] && echo "dry run: nothing below needs a GPU" || echo "real run")); budgets in s"
  printf '%-10s %6s %8s  %s\n' stage budget estimate "command (real run)"
  total_b=0
  total_e=0
  for s in "${RUN[@]}"; do
    printf '%-10s %6s %8s  %s\n' "$s" "${BUDGET[$s]}" "${ESTIMATE[$s]}" "$(command_of "$s")"
    total_b=$((total_b + BUDGET[$s]))
    total_e=$((total_e + ESTIMATE[$s]))
  done
  printf '%-10s %6s %8s  %s\n' total "$total_b" "$total_e" "(budget limit 540 s, estimate limit 480 s)"
  [ "$DRY" = 1 ] && echo "dry-run commands: tests -> pytest --collect-only -q -k \"$TEST_K\" $TEST_FILES; bench -> $PY $BENCH_DRY; sanitizers -> $PY <sanitize case> cpu full|small"
} | tee "$OUT/plan.txt"
total_b=$(awk '$1 == "total" {print $2}' "$OUT/plan.txt")
[ "$total_b" -gt 540 ] && note "WARNING: the stage budgets add up to $total_b s > 540 s; one device call may not finish"

if compgen -G ".whl/*.whl" >/dev/null && [ "$DRY" = 0 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  note "installed carried wheels: $(ls .whl | tr '\n' ' ')"
fi

{
  if [ "$DRY" = 1 ] && ! command -v nvidia-smi >/dev/null; then
    echo "dry run: no nvidia-smi here"
  else
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
    nvidia-smi 2>&1 | head -20
  fi
} >"$OUT/nvidia_smi.txt"

status=0
note "gpu_check.sh $SEL$([ "$DRY" = 1 ] && echo " --dry-run") started $(date -u +%FT%TZ), OUT=$OUT"
for s in "${RUN[@]}"; do
  log="$OUT/$(log_of "$s")"
  b="${BUDGET[$s]}"
  echo "==== stage $s (budget $b s) $(date -u +%TZ)" >>"$log"
  t0=$SECONDS
  timeout -k 10 "$b" bash "$SELF" __stage "$s" >>"$log" 2>&1
  rc=$?
  dt=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then
    note "stage $s: ok in ${dt} s (budget $b s)"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    note "stage $s: TIMED OUT after ${dt} s (budget $b s); see $(log_of "$s")"
    status=1
  else
    note "stage $s: FAILED rc=$rc in ${dt} s (budget $b s); tail of $(log_of "$s"):"
    tail -15 "$log" | sed 's/^/   | /' | tee -a "$OUT/summary.txt"
    status=1
  fi
  if [ "$s" = bench ]; then  # whatever rows the run left, also after a timeout
    if [ -f "$WORK/bench/results.csv" ]; then cp "$WORK/bench/results.csv" "$OUT/bench.csv"; fi
    if [ -f "$WORK/bench/results.md" ]; then
      cp "$WORK/bench/results.md" "$OUT/bench.md"
    elif [ -f "$OUT/bench.csv" ]; then
      "$PY" - "$OUT/bench.csv" >"$OUT/bench.md" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
cols = ["op", "divergence", "N", "V", "dtype", "provider", "backend", "status", "median_ms", "peak_mem_mb", "detail"]
print("# kd_kernels benchmark (partial: run.py did not finish, rows written so far)\n")
print("| " + " | ".join(cols) + " |")
print("|" + "---|" * len(cols))
for r in rows:
    print("| " + " | ".join(str(r.get(c, "")).replace("|", "/") for c in cols) + " |")
EOF
    fi
    if [ -f "$OUT/bench.csv" ]; then
      note "bench: $(($(wc -l <"$OUT/bench.csv") - 1)) rows in bench.csv"
    else
      note "bench: no rows written"
    fi
  fi
  if [ $rc -ne 0 ] && { [ "$s" = preflight ] || [ "$s" = build ]; }; then
    note "stopping: nothing after a failed $s can run"
    break
  fi
done
note "gpu_check.sh $SEL$([ "$DRY" = 1 ] && echo " --dry-run") finished with status $status in ${SECONDS} s; files in OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
