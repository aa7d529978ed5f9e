#!/usr/bin/env bash
# P-Tuning v2 on multi-turn chat data (JSON lines {"prompt", "response", "history": [[query, response], ...]}).
# Behaves like THUDM/ChatGLM-6B ptuning/train_chat.sh; settings come from the environment, extra arguments go to main.py.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$([ -x ../.venv/bin/python ] && echo ../.venv/bin/python || echo python3)}  # the repository's .venv when set up

PRE_SEQ_LEN=${PRE_SEQ_LEN:-128}
LR=${LR:-1e-2}
MODEL_PATH=${MODEL_PATH:-THUDM/chatglm-6b}
CHAT_TRAIN_DATA=${CHAT_TRAIN_DATA:-data/tiny_chat.json}
CHAT_VAL_DATA=${CHAT_VAL_DATA:-data/tiny_chat.json}
CHECKPOINT_NAME=${CHECKPOINT_NAME:-output/chat-chatglm-6b-pt-$PRE_SEQ_LEN-$LR}
QUANTIZATION_BIT=${QUANTIZATION_BIT-4}

"$PY" main.py \
    --do_train \
    --train_file "$CHAT_TRAIN_DATA" \
    --validation_file "$CHAT_VAL_DATA" \
    --prompt_column prompt \
    --response_column response \
    --history_column history \
    --overwrite_cache \
    --model_name_or_path "$MODEL_PATH" \
    --output_dir "$CHECKPOINT_NAME" \
    ${OVERWRITE:+--overwrite_output_dir} \
    --max_source_length "${MAX_SOURCE_LENGTH:-256}" \
    --max_target_length "${MAX_TARGET_LENGTH:-256}" \
    --per_device_train_batch_size "${BATCH_SIZE:-1}" \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps "${GRAD_ACCUM:-16}" \
    --predict_with_generate \
    --max_steps "${MAX_STEPS:-3000}" \
    --logging_steps "${LOGGING_STEPS:-10}" \
    --save_steps "${SAVE_STEPS:-1000}" \
    --learning_rate "$LR" \
    --pre_seq_len "$PRE_SEQ_LEN" \
    ${PREFIX_PROJECTION:+--prefix_projection} \
    ${QUANTIZATION_BIT:+--quantization_bit "$QUANTIZATION_BIT"} \
    "$@"
