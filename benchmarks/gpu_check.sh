#!/usr/bin/env bash
# GPU session check for kd_kernels (shared/docs/GPU.md): build with the CUDA kernels, run the GPU tests,
# compute-sanitizer once on a small case, then the benchmark suite (benchmarks/run.py --device cuda, which
# records a failing provider or case as an error row and carries on). Logs, CSV and markdown go to $OUT.
#
#   bash benchmarks/gpu_check.sh [all|build|test|sanitize|bench|quick]     (default: all)
#
# Through the device tool, one call (about 10 minutes: build ~2-4 min on 16 cores, tests ~2 min, bench
# ~4 min), or one stage per call while the machine stays warm (the build in the tree is kept between calls):
#   run(command="bash benchmarks/gpu_check.sh all", carry=[".whl"], timeout_s=600)
# Liger-Kernel is not installed there: to include it, fetch its pure-Python wheel here first
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel
# and carry ".whl"; this script installs any wheels it finds there into /tmp/site.
# Env: KD_KERNELS_CUDA_ARCHS (default 90), BENCH_ARGS (extra benchmarks/run.py arguments, e.g.
# "--ops kd_logits --providers kd_kernels kd_launcher torch").
set -uo pipefail

STAGE="${1:-all}"
OUT="${OUT:-$PWD/.bench_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0  # tests/conftest.py would otherwise switch Triton to its CPU interpreter
PY="${PYTHON:-python3}"
status=0

note() { echo "== $*" | tee -a "$OUT/summary.txt"; }

setup_wheels() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    note "installed carried wheels: $(ls .whl | tr '\n' ' ')"
  fi
}

stage_build() {
  note "build: KD_KERNELS_CUDA_ARCHS=${KD_KERNELS_CUDA_ARCHS:-90}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
    2>&1 | tee "$OUT/nvidia_smi.txt"
  KD_KERNELS_CUDA=1 KD_KERNELS_CUDA_ARCHS="${KD_KERNELS_CUDA_ARCHS:-90}" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" -m pip install --no-build-isolation --no-deps -v -e . >"$OUT/build.log" 2>&1
  local rc=$?
  "$PY" -c "import kd_kernels, json; i = kd_kernels.build_info(); print(json.dumps(i)); \
assert i['cuda'], 'built without CUDA'; print(kd_kernels.available_backends('cuda'))" 2>&1 \
    | tee -a "$OUT/summary.txt"
  local rc2=$?
  if [ $rc -ne 0 ] || [ $rc2 -ne 0 ]; then
    note "build FAILED (rc $rc / $rc2); tail of build.log:"
    tail -40 "$OUT/build.log"
    return 1
  fi
}

stage_test() {
  note "GPU tests (tests/test_cuda_backend.py, slow included)"
  "$PY" -m pytest -q -x -rs tests/test_cuda_backend.py -p no:cacheprovider >"$OUT/test_cuda.log" 2>&1
  local rc=$?
  tail -15 "$OUT/test_cuda.log"
  note "tests rc=$rc"
  return $rc
}

stage_sanitize() {
  note "compute-sanitizer memcheck, small case (every divergence, resident and streaming)"
  cat >/tmp/kd_sanitize.py <<'EOF'
import os, torch, kd_kernels
from kd_kernels._backends import get_backend
from kd_kernels._spec import Divergence, KDSpec
for path in ("auto", "stream", "cluster:2"):
    os.environ["KD_KERNELS_CUDA_PATH"] = path
    for d in Divergence:
        for sd, td in ((torch.bfloat16, torch.float32), (torch.float16, torch.float16)):
            s = torch.randn(5, 1031, device="cuda").to(sd)
            t = torch.randn(5, 1031, device="cuda").to(td)
            w = torch.tensor([1.0, 0.0, 0.5, 1.0, 2.0], device="cuda")
            g = torch.empty_like(s)
            get_backend("cuda").loss_grad(s, t, w, KDSpec(d, 0.3 if d >= 2 else 0.0, 1.0), g)
            get_backend("cuda").loss_grad(s, t, w, KDSpec(d, 0.3 if d >= 2 else 0.0, 1.0), s)  # in place
torch.cuda.synchronize()
print("sanitize case done")
EOF
  compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" /tmp/kd_sanitize.py >"$OUT/sanitizer.log" 2>&1
  local rc=$?
  tail -6 "$OUT/sanitizer.log"
  note "compute-sanitizer rc=$rc"
  return $rc
}

stage_bench() {
  note "benchmark suite (benchmarks/run.py --device cuda ${BENCH_ARGS:-})"
  # shellcheck disable=SC2086
  "$PY" benchmarks/run.py --device cuda --out "$OUT/bench" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
  return "${PIPESTATUS[0]}"
}

setup_wheels
case "$STAGE" in
  build) stage_build || status=1 ;;
  test) stage_test || status=1 ;;
  sanitize) stage_sanitize || status=1 ;;
  bench) stage_bench || status=1 ;;
  quick)
    stage_build || exit 1
    BENCH_ARGS="--quick ${BENCH_ARGS:-}" stage_bench || status=1
    ;;
  all)
    stage_build || exit 1
    stage_test || status=1
    stage_sanitize || status=1
    stage_bench || status=1
    ;;
  *)
    echo "unknown stage $STAGE; use all, build, test, sanitize, bench or quick" >&2
    exit 2
    ;;
esac
note "gpu_check.sh $STAGE finished with status $status"
exit $status
