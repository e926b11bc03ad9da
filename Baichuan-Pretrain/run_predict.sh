#!/usr/bin/env bash
# Evaluate a pretrained model on a held-out book: sliding-window perplexity + scored continuations.
#   MODEL_PATH=output/pretrain BOOK=/data/novels/异世邪君.txt bash Baichuan-Pretrain/run_predict.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

MODEL_PATH=${MODEL_PATH:-output/pretrain}             # written by ds_finetune.sh
BOOK=${BOOK:-$ROOT/data_examples/novels/xingchen_ke.txt}  # the book held out of pretraining (EVAL_BOOKS)
OUTPUT_DIR=${OUTPUT_DIR:-$MODEL_PATH/eval}
POSITIONS=${POSITIONS:-20}                            # continuation points spread over the book
CONTEXT_TOKENS=${CONTEXT_TOKENS:-512}
NEW_TOKENS=${NEW_TOKENS:-200}
WINDOW=${WINDOW:-0}                                   # perplexity window; 0 = the model's positions (max 2048)
RETRIEVAL_INDEX=${RETRIEVAL_INDEX:-}                  # Baichuan-Embedding index with BOOK: adds a 前情提要 block
NUM_GPUS=${NUM_GPUS:-}                                # processes, one per GPU, windows and points split; empty: all
MASTER_PORT=${MASTER_PORT:-29500}                     # their rendezvous port when more than one

. "$ROOT/novelkit/launch.sh"

launch_each "$ROOT/Baichuan-Pretrain/evaluate.py" --model_path "$MODEL_PATH" --book "$BOOK" --output_dir "$OUTPUT_DIR" \
  --positions "$POSITIONS" --context_tokens "$CONTEXT_TOKENS" --new_tokens "$NEW_TOKENS" --window "$WINDOW" \
  ${RETRIEVAL_INDEX:+--retrieval_index "$RETRIEVAL_INDEX"} "$@"
