#!/usr/bin/env bash
# LoRA (PEFT) on the attention projections instead of P-Tuning: the third option the original README compared
# (lr 5e-4). Checkpoints hold only the LoRA matrices, in PEFT's files (adapter_model.safetensors +
# adapter_config.json): every demo and server takes one as --lora DIR.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$([ -x ../.venv/bin/python ] && echo ../.venv/bin/python || echo python3)}  # the repository's .venv when set up

LORA_RANK=${LORA_RANK:-8}
LR=${LR:-5e-4}
MODEL_PATH=${MODEL_PATH:-THUDM/chatglm-6b}

"$PY" main.py \
    --do_train \
    --train_file "${TRAIN_FILE:-AdvertiseGen/train.json}" \
    --prompt_column content \
    --response_column summary \
    --model_name_or_path "$MODEL_PATH" \
    --output_dir "${OUTPUT_DIR:-output/adgen-chatglm-6b-lora-$LORA_RANK-$LR}" \
    ${OVERWRITE:+--overwrite_output_dir} \
    --max_source_length "${MAX_SOURCE_LENGTH:-64}" \
    --max_target_length "${MAX_TARGET_LENGTH:-64}" \
    --per_device_train_batch_size "${BATCH_SIZE:-1}" \
    --gradient_accumulation_steps "${GRAD_ACCUM:-16}" \
    --max_steps "${MAX_STEPS:-3000}" \
    --logging_steps "${LOGGING_STEPS:-10}" \
    --save_steps "${SAVE_STEPS:-1000}" \
    --learning_rate "$LR" \
    --lora_rank "$LORA_RANK" \
    "$@"
