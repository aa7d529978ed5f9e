#!/usr/bin/env bash
# Set up from scratch (virtual environment, packages) and run the checks CI runs: formatter, linter, the quick
# benchmark gate, the test suite, and the CPU-dependent tests again on the AVX2 path (an AVX-512 machine also
# runs what an AVX2-only one does). About 4 minutes on 2 cores with the packages there, 10 on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "==> [$(date +%H:%M:%S)] $*"; }
# The browser tests drive Debian's Chromium; install it when missing and we may (root, or sudo without a password).
if ! command -v chromium >/dev/null 2>&1; then
  step "installing Chromium and ChromeDriver for the browser tests (apt-get)"
  if [ "$(id -u)" -eq 0 ]; then
    (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -q chromium chromium-driver) || echo "could not install chromium" >&2
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver) || echo "could not install chromium" >&2
  fi
fi
bash scripts/setup.sh dev
step "ruff format --check, ruff check"
.venv/bin/ruff format --check .
.venv/bin/ruff check .
# End-to-end speed, quick mode (full width, 1 layer): prints its figures; fails only if the fused INT8/INT4 decode
# is under 4x the reference-style path measured in the same run (skips when ../shared/models is absent).
step "quick end-to-end benchmark (benchmarks/bench_generate.py --quick, about 2 minutes)"
.venv/bin/python benchmarks/bench_generate.py --quick
run_pytest() {
  set +e
  .venv/bin/python -m pytest -q "$@"
  local rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests" >&2
    exit 1
  fi
  [ "$rc" -eq 0 ] || exit "$rc"
}
step "test suite (pytest, about 7 minutes on 2 cores)"
run_pytest "$@"
# The tests whose path depends on the CPU, again as an AVX2-only machine runs them: our kernels built for AVX2,
# torch's kernels and oneDNN capped at AVX2 (so bf16 matmuls are not native). Skipped where that is this machine
# already, or on a CPU without AVX2.
BEYOND_AVX2="import kernels, sys; sys.exit(not (kernels.can_run('avx2') and 'avx512f' in kernels.cpu_flags()))"
if [ $# -eq 0 ] && .venv/bin/python -c "$BEYOND_AVX2" 2>/dev/null; then
  step "CPU-dependent tests again on the AVX2 path (CHATGLM_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)"
  CHATGLM_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 run_pytest \
    tests/test_kernels.py tests/test_linear.py tests/test_quantization.py tests/test_static_decode.py \
    tests/test_generation.py tests/test_modeling.py tests/test_golden_models.py tests/test_kv_cache.py \
    tests/test_utils.py tests/test_layers.py tests/test_engine.py
fi
step "all checks passed"
