#!/usr/bin/env bash
# Generate and score with a fully fine-tuned checkpoint (from ds_train_finetune.sh).
# Behaves like THUDM/ChatGLM-6B ptuning/evaluate_finetune.sh; settings come from the environment.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$([ -x ../.venv/bin/python ] && echo ../.venv/bin/python || echo python3)}  # the repository's .venv when set up

CHECKPOINT=${CHECKPOINT:-adgen-chatglm-6b-ft-1e-4}
STEP=${STEP:-3000}
VAL_FILE=${VAL_FILE:-AdvertiseGen/dev.json}

"$PY" main.py \
    --do_predict \
    --validation_file "$VAL_FILE" \
    --test_file "$VAL_FILE" \
    --overwrite_cache \
    --prompt_column content \
    --response_column summary \
    --model_name_or_path "./output/$CHECKPOINT/checkpoint-$STEP" \
    --output_dir "./output/$CHECKPOINT" \
    --max_source_length 256 \
    --max_target_length 256 \
    --per_device_eval_batch_size 1 \
    --predict_with_generate \
    --fp16_full_eval \
    "$@"
