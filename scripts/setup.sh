#!/usr/bin/env bash
# Create .venv and install everything the toolkit needs (torch first, pinned). Safe to re-run.
# Usage: bash scripts/setup.sh [dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating virtual environment in .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned, so nothing later drags in a CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
if [ "${1:-}" = "dev" ]; then
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  # Triton: the CUDA INT4/INT8 kernels; the tests run them on the CPU under its interpreter. A CUDA torch brings
  # its own matching triton, so it is installed only where none imports.
  .venv/bin/python -c "import triton" 2>/dev/null || .venv/bin/python -m pip install --quiet "triton==3.9.0"
else
  .venv/bin/python -m pip install --quiet -r requirements.txt
fi
.venv/bin/python -c "import torch, transformers, sentencepiece; print('ready: torch', torch.__version__, '| transformers', transformers.__version__)"
