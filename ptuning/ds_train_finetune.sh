#!/usr/bin/env bash
# Full-parameter fine-tuning with DeepSpeed ZeRO-2 (deepspeed.json) on several GPUs; needs `pip install deepspeed`.
# Behaves like THUDM/ChatGLM-6B ptuning/ds_train_finetune.sh; settings come from the environment, extra arguments go to main.py.
set -euo pipefail
cd "$(dirname "$0")"

LR=${LR:-1e-4}
MODEL_PATH=${MODEL_PATH:-THUDM/chatglm-6b}
MASTER_PORT=${MASTER_PORT:-$(shuf -n 1 -i 10000-65535)}

deepspeed --num_gpus="${NUM_GPUS:-4}" --master_port "$MASTER_PORT" main.py \
    --deepspeed deepspeed.json \
    --do_train \
    --train_file "${TRAIN_FILE:-AdvertiseGen/train.json}" \
    --test_file "${VAL_FILE:-AdvertiseGen/dev.json}" \
    --prompt_column content \
    --response_column summary \
    --overwrite_cache \
    --model_name_or_path "$MODEL_PATH" \
    --output_dir "${OUTPUT_DIR:-./output/adgen-chatglm-6b-ft-$LR}" \
    ${OVERWRITE:+--overwrite_output_dir} \
    --max_source_length 64 \
    --max_target_length 64 \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps 1 \
    --predict_with_generate \
    --max_steps "${MAX_STEPS:-5000}" \
    --logging_steps 10 \
    --save_steps 1000 \
    --learning_rate "$LR" \
    --fp16 \
    "$@"
