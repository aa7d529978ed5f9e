#!/usr/bin/env bash
# Behaves like THUDM/ChatGLM-6B ptuning/web_demo.sh.
set -euo pipefail
cd "$(dirname "$0")"
PRE_SEQ_LEN=${PRE_SEQ_LEN:-128}

${PYTHON:-python3} web_demo.py \
    --model_name_or_path "${MODEL_PATH:-THUDM/chatglm-6b}" \
    --ptuning_checkpoint "${PTUNING_CHECKPOINT:-output/adgen-chatglm-6b-pt-128-2e-2/checkpoint-3000}" \
    --pre_seq_len "$PRE_SEQ_LEN" \
    "$@"
