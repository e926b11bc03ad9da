#!/usr/bin/env bash
# Generate for a dev file with the fine-tuned model and print ROUGE; or fill a test file (submission mode).
#   MODEL_PATH=output/full DATA=data/csl/dev.json bash Baichuan-Finetune/run_predict.sh
#   DATA=data/csl/test.json SUBMIT=output/full/submit.json bash Baichuan-Finetune/run_predict.sh
# A killed run resumes where it stopped. Extra arguments go to predict.py (--do_sample, --top_p, --interactive …).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

MODEL_PATH=${MODEL_PATH:-output/full}             # folder written by ds_finetune.sh
DATA=${DATA:-$ROOT/data_examples/sft/dev.jsonl}
OUTPUT_DIR=${OUTPUT_DIR:-$MODEL_PATH}             # predictions.jsonl + metrics.json
SUBMIT=${SUBMIT:-}                                # submission mode: write DATA's records with outputs filled here
BATCH=${BATCH:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-}                # empty: the model's generation_config.json, else 256
RETRIEVAL_INDEX=${RETRIEVAL_INDEX:-}              # Baichuan-Embedding index: adds a 前情提要 block; empty: none
NUM_GPUS=${NUM_GPUS:-}                            # processes, one per GPU, records split across them; empty: all
MASTER_PORT=${MASTER_PORT:-29500}                 # their rendezvous port when more than one

. "$ROOT/novelkit/launch.sh"

launch_each "$ROOT/Baichuan-Finetune/predict.py" --model_path "$MODEL_PATH" --data "$DATA" --output_dir "$OUTPUT_DIR" \
  --batch_size "$BATCH" ${MAX_NEW_TOKENS:+--max_new_tokens "$MAX_NEW_TOKENS"} ${SUBMIT:+--submit_file "$SUBMIT"} \
  ${RETRIEVAL_INDEX:+--retrieval_index "$RETRIEVAL_INDEX"} "$@"
