#!/usr/bin/env bash
# Generate for a dev file with the QLoRA adapter and print ROUGE; or fill a test file (submission mode).
#   LORA_MODEL=output/qlora DATA=data/ner/dev.json bash Baichuan-Finetune-QLora/run_predict.sh
#   DATA=data/ner/test.json SUBMIT=output/qlora/submit.json bash Baichuan-Finetune-QLora/run_predict.sh
# A killed run resumes where it stopped. Extra arguments go to predict.py (--do_sample, --interactive --with_prompt …).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

MODEL_PATH=${MODEL_PATH:-}                        # empty: the adapter's recorded base, else the embedded default
LORA_MODEL=${LORA_MODEL:-output/qlora}            # adapter folder written by ds_finetune.sh
DATA=${DATA:-$ROOT/data_examples/sft/dev.jsonl}
OUTPUT_DIR=${OUTPUT_DIR:-$LORA_MODEL}             # predictions.jsonl + metrics.json
SUBMIT=${SUBMIT:-}                                # submission mode: write DATA's records with outputs filled here
LOAD_IN_4BIT=${LOAD_IN_4BIT-1}                    # 1: the base in NF4, as it was trained; empty: full precision
BATCH=${BATCH:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-}                # empty: the model's generation_config.json, else 256
RETRIEVAL_INDEX=${RETRIEVAL_INDEX:-}              # Baichuan-Embedding index: adds a 前情提要 block; empty: none
NUM_GPUS=${NUM_GPUS:-}                            # processes, one per GPU, records split across them; empty: all
MASTER_PORT=${MASTER_PORT:-29500}                 # their rendezvous port when more than one

. "$ROOT/novelkit/launch.sh"

launch_each "$ROOT/Baichuan-Finetune-QLora/predict.py" --model_path "$MODEL_PATH" --lora_model "$LORA_MODEL" \
  --data "$DATA" --output_dir "$OUTPUT_DIR" --batch_size "$BATCH" ${LOAD_IN_4BIT:+--load_in_4bit} \
  ${MAX_NEW_TOKENS:+--max_new_tokens "$MAX_NEW_TOKENS"} ${SUBMIT:+--submit_file "$SUBMIT"} \
  ${RETRIEVAL_INDEX:+--retrieval_index "$RETRIEVAL_INDEX"} "$@"
