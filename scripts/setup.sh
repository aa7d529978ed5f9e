#!/usr/bin/env bash
# Create .venv and install everything the toolkit needs (torch first, pinned). Safe to re-run.
# Usage: bash scripts/setup.sh [dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { echo "==> [$(date +%H:%M:%S)] $*"; }
if [ ! -x .venv/bin/python ]; then
  step "creating the virtual environment .venv"
  "$PY" -m venv .venv
fi
step "pip: upgrading pip"
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned, so nothing later pulls in another build. Which build pip finds is the index's choice:
# on plain PyPI a Linux torch is the CUDA build (GBs); TORCH_INDEX_URL (e.g. PyTorch's CPU-only wheel index)
# makes it the CPU one.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  step "pip: torch 2.13.0 from TORCH_INDEX_URL"
  .venv/bin/python -m pip install "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
else
  step "pip: torch 2.13.0 (the build the package index offers; TORCH_INDEX_URL chooses another)"
  .venv/bin/python -m pip install "torch==2.13.0"
fi
if [ "${1:-}" = "dev" ]; then
  step "pip: requirements-dev.txt (the toolkit's packages and the test tools)"
  .venv/bin/python -m pip install -r requirements-dev.txt
  # Triton: the CUDA INT4/INT8 kernels; the tests run them on the CPU under its interpreter. A CUDA torch brings
  # its own matching triton, so it is installed only where none imports.
  .venv/bin/python -c "import triton" 2>/dev/null || { step "pip: triton 3.9.0"; .venv/bin/python -m pip install "triton==3.9.0"; }
else
  step "pip: requirements.txt"
  .venv/bin/python -m pip install -r requirements.txt
fi
# The repository on the venv's import path: `.venv/bin/python any_script.py` can `import chatglm` from anywhere.
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
pwd > "$site/chatglm-toolkit.pth"
(cd / && "$OLDPWD/.venv/bin/python" -c "import torch, transformers, sentencepiece, chatglm; print('ready: torch', torch.__version__, '| transformers', transformers.__version__, '| chatglm from', chatglm.__path__[0])")
