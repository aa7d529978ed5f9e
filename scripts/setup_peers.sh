#!/usr/bin/env bash
# The CPU peers for benchmarks/bench_peers.py, built for this CPU into .venv (not part of the test setup: the two
# builds take about 5 and 6-12 minutes on 2 cores). Run scripts/setup.sh first.
#   chatglm-cpp 0.4.2        (its -DGGML_NATIVE is ignored: -march=native goes in through the compiler flags)
#   llama-cpp-python 0.3.36  (-DGGML_NATIVE=ON, AMX off), and its source unpacked into .peers/ for llama.cpp's converter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "error: .venv is missing: run bash scripts/setup.sh first" >&2; exit 1; }
step() { echo "==> [$(date +%H:%M:%S)] $*"; }
step "converter dependencies (tabulate, diskcache)"
"$PY" -m pip install tabulate diskcache
step "chatglm-cpp 0.4.2, built with -march=native (about 5 minutes)"
CMAKE_ARGS="-DCMAKE_POLICY_VERSION_MINIMUM=3.5 -DCMAKE_C_FLAGS=-march=native -DCMAKE_CXX_FLAGS=-march=native" \
    "$PY" -m pip install --no-deps chatglm-cpp==0.4.2
# On AMX CPUs its AMX-INT8 matmul dies with SIGILL (tileloadd in an OpenMP worker, seen on a Sapphire Rapids VM,
# 2026-12-06): build it without AMX there, so it runs its AVX-512 VNNI kernels (with weight repacking).
NO_AMX=""
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
SDIST=.peers/llama_cpp_python-0.3.36.tar.gz
step "llama-cpp-python 0.3.36: its source into .peers/ (built from there, and llama.cpp's converter is in it)"
mkdir -p .peers
[ -f "$SDIST" ] || "$PY" -m pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d .peers
[ -f .peers/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py ] || tar xzf "$SDIST" -C .peers
step "llama-cpp-python 0.3.36, built with GGML_NATIVE ${NO_AMX:+and $NO_AMX }(about 6-12 minutes)"
CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'" \
    "$PY" -m pip install --no-deps --no-cache-dir "$SDIST"
step "done: python benchmarks/bench_peers.py --workdir DIR"
