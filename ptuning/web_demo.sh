#!/usr/bin/env bash
# Behaves like THUDM/ChatGLM-6B ptuning/web_demo.sh.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$([ -x ../.venv/bin/python ] && echo ../.venv/bin/python || echo python3)}  # the repository's .venv when set up

"$PY" web_demo.py \
    --model_name_or_path "${MODEL_PATH:-THUDM/chatglm-6b}" \
    --ptuning_checkpoint "${PTUNING_CHECKPOINT:-output/adgen-chatglm-6b-pt-128-2e-2/checkpoint-3000}" \
    ${PRE_SEQ_LEN:+--pre_seq_len "$PRE_SEQ_LEN"} \
    "$@"
