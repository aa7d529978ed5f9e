#!/usr/bin/env bash
# P-Tuning v2 on AdvertiseGen-format data (JSON lines {"content", "summary"}).
# Behaves like THUDM/ChatGLM-6B ptuning/train.sh, with its defaults; every setting can be changed from the
# environment (e.g. MODEL_PATH=~/models/chatglm2-6b QUANTIZATION_BIT= bash train.sh) and extra arguments
# are passed on to main.py. A restarted run resumes from the last checkpoint in OUTPUT_DIR (OVERWRITE=1: start over).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$([ -x ../.venv/bin/python ] && echo ../.venv/bin/python || echo python3)}  # the repository's .venv when set up

PRE_SEQ_LEN=${PRE_SEQ_LEN:-128}
LR=${LR:-2e-2}
MODEL_PATH=${MODEL_PATH:-THUDM/chatglm-6b}  # a local checkpoint directory
TRAIN_FILE=${TRAIN_FILE:-AdvertiseGen/train.json}
VAL_FILE=${VAL_FILE:-AdvertiseGen/dev.json}
OUTPUT_DIR=${OUTPUT_DIR:-output/adgen-chatglm-6b-pt-$PRE_SEQ_LEN-$LR}
QUANTIZATION_BIT=${QUANTIZATION_BIT-4}  # set it empty to train on the float model

"$PY" main.py \
    --do_train \
    --train_file "$TRAIN_FILE" \
    --validation_file "$VAL_FILE" \
    --prompt_column content \
    --response_column summary \
    --overwrite_cache \
    --model_name_or_path "$MODEL_PATH" \
    --output_dir "$OUTPUT_DIR" \
    ${OVERWRITE:+--overwrite_output_dir} \
    --max_source_length "${MAX_SOURCE_LENGTH:-64}" \
    --max_target_length "${MAX_TARGET_LENGTH:-64}" \
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
