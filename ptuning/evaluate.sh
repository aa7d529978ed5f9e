#!/usr/bin/env bash
# Generate for the dev set with a P-Tuning checkpoint and score it (ROUGE-1/2/L, BLEU-4); writes
# output/$CHECKPOINT/generated_predictions.txt and predict_results.json.
# Behaves like THUDM/ChatGLM-6B ptuning/evaluate.sh; settings come from the environment, extra arguments go to main.py.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$([ -x ../.venv/bin/python ] && echo ../.venv/bin/python || echo python3)}  # the repository's .venv when set up

CHECKPOINT=${CHECKPOINT:-adgen-chatglm-6b-pt-128-2e-2}
STEP=${STEP:-3000}
MODEL_PATH=${MODEL_PATH:-THUDM/chatglm-6b}
VAL_FILE=${VAL_FILE:-AdvertiseGen/dev.json}
OUTPUT_DIR=${OUTPUT_DIR:-./output/$CHECKPOINT}
QUANTIZATION_BIT=${QUANTIZATION_BIT-4}

"$PY" main.py \
    --do_predict \
    --validation_file "$VAL_FILE" \
    --test_file "$VAL_FILE" \
    --overwrite_cache \
    --prompt_column content \
    --response_column summary \
    --model_name_or_path "$MODEL_PATH" \
    --ptuning_checkpoint "${PTUNING_CHECKPOINT:-$OUTPUT_DIR/checkpoint-$STEP}" \
    --output_dir "$OUTPUT_DIR" \
    --max_source_length "${MAX_SOURCE_LENGTH:-64}" \
    --max_target_length "${MAX_TARGET_LENGTH:-64}" \
    --per_device_eval_batch_size "${EVAL_BATCH_SIZE:-1}" \
    --predict_with_generate \
    ${PRE_SEQ_LEN:+--pre_seq_len "$PRE_SEQ_LEN"} \
    ${QUANTIZATION_BIT:+--quantization_bit "$QUANTIZATION_BIT"} \
    "$@"
