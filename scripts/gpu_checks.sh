#!/usr/bin/env bash
# What a session with a CUDA GPU runs: the CUDA tests, then the GPU benchmarks. Output goes to the terminal and
# to one file per step in $OUT (default: gpu-results/). Uses the python that has a CUDA torch and triton
# (PYTHON, default python3); nothing is installed.
# Usage: bash scripts/gpu_checks.sh [CONFIG_DIR [STEP ...]]
#   CONFIG_DIR holds chatglm2-6b's config.json (default ../shared/models/chatglm2-6b)
#   STEP: tests gemv generate context compile engine (default: all, in that order; together they may need more
#   than one 10-minute device command: run "tests gemv generate" first, then "context compile engine")
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
CONFIG=${1:-../shared/models/chatglm2-6b}
shift || true
STEPS=${*:-tests gemv generate context compile engine}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" | head -15
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

for step in $STEPS; do
    echo "=== $step ($(date +%T))"
    case $step in
    tests) # the Triton kernels compiled on the GPU, the quantized tiny model on CUDA, utils' cuda:0+cpu split,
        # decode steps replayed as CUDA graphs and compiled (fp16 and INT4) against eager decode
        # and the engine's batched decode (rows at their own positions; requests batched together) against alone
        "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_ops.py tests/test_utils.py \
            tests/test_static_decode.py tests/test_rows_at_positions.py tests/test_engine.py -k "cuda" \
            --durations=8 2>&1 | tee "$OUT/cuda-tests.txt" | tail -25 ;;
    gemv) # GEMV at the real shapes: Triton INT8/INT4 against cuBLAS fp16/bf16, GB/s against the copy bandwidth
        "$PY" benchmarks/bench_gemv.py --device cuda 2>&1 | tee "$OUT/gemv-cuda.txt" ;;
    generate) # end to end, all 28 blocks (the GPU holds them; nothing is scaled): eager decode, CUDA-graph
        # decode, reference
        "$PY" benchmarks/bench_generate.py --device cuda --config "$CONFIG" --layers 28 \
            --modes fp16 bf16 int8 int4 --threads 1 --paths ours ref graph 2>&1 | tee "$OUT/generate-cuda.txt" ;;
    context) # memory at a 32K context, INT4, all 28 blocks (the original claims ~11 GB for chatglm2-6b-32k)
        "$PY" benchmarks/bench_generate.py --device cuda --config "$CONFIG" --context 32768 --modes int4 \
            --threads 1 2>&1 | tee "$OUT/context-cuda.txt" ;;
    compile) # torch.compile, then captured in a graph: compiling takes minutes, so it has a time limit and
        # 4 blocks at full width (scaled to 28)
        timeout 240 "$PY" benchmarks/bench_generate.py --device cuda --config "$CONFIG" --modes fp16 int4 \
            --threads 1 --paths ours compile 2>&1 | tee "$OUT/generate-cuda-compile.txt" ;;
    engine) # many users at once (issue 32): 8 streaming clients through the engine against one alone and against
        # taking turns, all 28 blocks, INT4 (Triton) and fp16; then a follow-up turn's time to first token
        for mode in int4 fp16; do
            timeout 280 "$PY" benchmarks/bench_engine.py --device cuda --config "$CONFIG" --layers 28 --mode $mode \
                --new 64 --threads 1 2>&1 | tee "$OUT/engine-cuda-$mode.txt"
        done ;;
    *) echo "unknown step $step (tests gemv generate context compile engine)" >&2; exit 2 ;;
    esac
done
