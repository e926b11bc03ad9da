#!/usr/bin/env bash
# Generate for a dev file with the trained adapter and print ROUGE. Override any variable from the environment:
#   LORA_MODEL=output/lora DATA=my_dev.jsonl bash Baichuan-Finetune-Lora/run_predict.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

MODEL_PATH=${MODEL_PATH:-}                        # empty: the adapter's recorded base, else the embedded default
LORA_MODEL=${LORA_MODEL:-output/lora}             # adapter folder written by ds_finetune.sh
DATA=${DATA:-$ROOT/data_examples/sft/dev.jsonl}
OUTPUT_DIR=${OUTPUT_DIR:-$LORA_MODEL}             # predictions.jsonl + metrics.json
BATCH=${BATCH:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-256}

python "$ROOT/Baichuan-Finetune-Lora/predict.py" --model_path "$MODEL_PATH" --lora_model "$LORA_MODEL" \
  --data "$DATA" --output_dir "$OUTPUT_DIR" --batch_size "$BATCH" --max_new_tokens "$MAX_NEW_TOKENS" "$@"
