#!/usr/bin/env bash
# One command for the GPU machine: build, info, tests, optional memcheck, full benchmark.
#
#   bash scripts/gpu_check.sh
#
# Every step runs under its own time limit and the run goes on past failures, so one call collects
# everything; steps.tsv records each step's exit code (124 = hit its time limit) and duration.
# Logs and results go to $OUT when it is set, else benchmarks/results/gpu-<date>/.
# The whole run is sized for about ten minutes of machine time. Knobs (seconds unless noted):
#   GPU_CHECK_BUDGET_S=570  total; the benchmark gets what the earlier steps leave
#   BUILD_S=240 INFO_S=60 TESTS_S=240 SANITIZER_S=60
# (First H200 run, 2026-11-30: build 51-66 s with 16 jobs; the GPU-touching tests ~200 s on 16 workers;
# the benchmark's eager and fused rows ~150 s, each compiled row tens of seconds more.)
#   SANITIZER=auto|0|1      memcheck on the CUDA kernel tests when compute-sanitizer exists (auto)
#   SANITIZER_FILTER='float32 and not channels_last'   pytest -k for the memcheck run (it is slow)
#   BENCH_COMPILE_MODE=default  BENCH_E2E_COMPILE_MODE=default  (max-autotune did not fit the budget)
#   BENCH_ARGS='...'        extra arguments for `python -m benchmarks`
#   SKIP_BUILD=1            reuse an existing build
#   BENCH=0                 stop after the tests (a second call with SKIP_BUILD=1 benchmarks)
#   TESTS_FILTER='cuda or triton or gpu'  pytest -k for the tests step; TEST_WORKERS=12 TEST_TIMEOUT_S=240
set -u

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-570}
RESULTS=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
LOGS=$RESULTS/logs
mkdir -p "$LOGS"
STEPS=$RESULTS/steps.tsv
printf 'step\texit_code\tseconds\tlimit_s\n' > "$STEPS"

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1

remaining() { echo $((BUDGET - (SECONDS - START))); }

# step NAME LIMIT_S CMD...: run CMD with output in logs/NAME.log, limited to LIMIT_S and to what is
# left of the budget; never stops the script.
step() {
    local name=$1 limit=$2
    shift 2
    local left
    left=$(remaining)
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -le 5 ]; then
        printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >> "$STEPS"
        echo "== $name: skipped, time budget used up"
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS rc
    # -k: a step that ignores SIGTERM (a hung kernel) is killed 15 s later.
    timeout -k 15 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) "$limit" >> "$STEPS"
    echo "   exit $rc after $((SECONDS - t0))s; last lines:"
    tail -n 5 "$LOGS/$name.log" | sed 's/^/   | /'
}

# The steps table, the benchmark report if any; exits 0 only when every step that ran exited 0.
finish() {
    echo
    echo "== steps (exit code 124 = time limit)"
    column -t -s $'\t' "$STEPS" 2>/dev/null || cat "$STEPS"
    [ -f "$RESULTS/bench/results.md" ] && cat "$RESULTS/bench/results.md"
    echo "results and logs in $RESULTS ($((SECONDS - START)) s)"
    awk -F'\t' 'NR > 1 && $2 != "0" && $2 != "skipped" { bad = 1 } END { exit bad }' "$STEPS"
    exit
}

{
    echo "date: $(date -Is)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) modified files"
    echo "python: $($PY --version 2>&1)"
    echo "nvcc: $(command -v nvcc || echo missing)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS RLA_EXT_NO_CUDA=${RLA_EXT_NO_CUDA:-}"
} > "$RESULTS/environment.txt" 2>&1
cat "$RESULTS/environment.txt"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    step build "${BUILD_S:-240}" "$PY" -m pip install --no-build-isolation --no-deps -e .
fi
step info "${INFO_S:-60}" "$PY" -m rla_ext.info
cp "$LOGS/info.log" "$RESULTS/build_info.json" 2>/dev/null || true

# The CPU stand-ins for a GPU (the CUDA emulator, the sm_90 compile of every Triton launch) are left
# to CPU CI: here the same kernels run for real (tests/csrc/test_cuda_kernels.py, tests/triton_kernels).
# The CPU-only tests are CI's; here the tests that touch the GPU run, spread over the cores (xdist:
# Triton's JIT and the autotuner's first timings are CPU-bound), each under a time limit.
workers=()
if "$PY" -c "import xdist" 2> /dev/null; then workers=(-n "${TEST_WORKERS:-12}"); fi
timeout_arg=()
if "$PY" -c "import pytest_timeout" 2> /dev/null; then timeout_arg=(--timeout "${TEST_TIMEOUT_S:-240}"); fi
# Failures are written to failures.txt as they happen (a step killed at its limit prints no summary);
# the kernel tests go first so that a short budget still covers them.
step tests "${TESTS_S:-240}" env PYTHONPATH=scripts FAILURE_LOG="$RESULTS/failures.txt" \
    "$PY" -m pytest -p pytest_failure_log -q -rfEs --durations=15 --junitxml="$RESULTS/junit.xml" \
    "${workers[@]}" "${timeout_arg[@]}" -k "${TESTS_FILTER:-cuda or triton or gpu}" \
    tests/csrc/test_cuda_kernels.py tests/triton_kernels tests/ops tests/nn tests/models tests \
    --ignore=tests/csrc/emulate --ignore=tests/triton_kernels/test_triton_aot.py

SANITIZER=${SANITIZER:-auto}
if [ "$SANITIZER" != 0 ] && command -v compute-sanitizer > /dev/null; then
    # Without the caching allocator every tensor is its own allocation, so an out-of-bounds
    # access inside a pooled block is reported instead of landing in a neighbour's memory.
    step memcheck "${SANITIZER_S:-60}" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
        "$PY" -m pytest -q -x tests/csrc/test_cuda_kernels.py -k "${SANITIZER_FILTER:-float32 and not channels_last}"
elif [ "$SANITIZER" = 1 ]; then
    printf 'memcheck\tmissing\t0\t0\n' >> "$STEPS"
    echo "== memcheck: compute-sanitizer not found"
fi

if [ "${BENCH:-1}" = 0 ]; then finish; fi

# The benchmark stops starting new cases a minute before its hard limit and still writes its report.
left=$(remaining)
bench_minutes=$(awk -v s="$left" 'BEGIN { m = (s - 60) / 60; if (m < 0.5) m = 0.5; printf "%.1f", m }')
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
step bench "$left" "$PY" -m benchmarks --out "$RESULTS/bench" --no-progress --max-minutes "$bench_minutes" \
    --compile-mode "${BENCH_COMPILE_MODE:-default}" \
    --e2e-compile-mode "${BENCH_E2E_COMPILE_MODE:-default}" ${BENCH_ARGS:-}
# The measured cuda-vs-triton order for `auto`; copy it over rla_ext/_auto_table.py to adopt it.
if [ -f "$RESULTS/bench/results.json" ]; then
    step auto_table 30 "$PY" -m benchmarks.auto_table "$RESULTS/bench/results.json" --out "$RESULTS/_auto_table.py"
fi

finish
