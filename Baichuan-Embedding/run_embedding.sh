#!/usr/bin/env bash
# Embed a file or folder into a local index (FAISS + SQLite). Rerun to append new files; a killed run resumes.
# Override any variable from the environment:
#   MODEL_PATH=/models/Baichuan2-7B-Base DATA=my_novels/ INDEX_DIR=output/novels bash Baichuan-Embedding/run_embedding.sh
# Search and repair:
#   python Baichuan-Embedding/embed.py search --index output/embedding "师父被妖怪捉去了"
#   python Baichuan-Embedding/embed.py repair --index output/embedding
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

MODEL_PATH=${MODEL_PATH:-}                       # empty: the index's model, for a new index the embedded default
DATA=${DATA:-$ROOT/data_examples/novels}         # a .txt novel, a folder, or .jsonl/.json/.tsv in any supported format
INDEX_DIR=${INDEX_DIR:-output/embedding}         # meta.sqlite + index.faiss
MAX_CHARS=${MAX_CHARS:-800}                      # passage size in characters (novels are cut at sentence ends)
# Empty: the index's own setting (for a new index the default in brackets); changing one on an existing index is an error.
POOLING=${POOLING:-}                             # mean (default) | last
LAYER=${LAYER:-}                                 # hidden state to pool: -1 = the last layer (default), 0 = embeddings
MAX_LENGTH=${MAX_LENGTH:-}                       # tokens per passage (1024)
INDEX_TYPE=${INDEX_TYPE:-}                       # flat (exact, default) | hnsw (approximate, for millions of vectors)
BATCH=${BATCH:-16}                               # passages per forward pass and per commit
NUM_GPUS=${NUM_GPUS:-}                           # processes, one per GPU, batches split across them; empty: all
MASTER_PORT=${MASTER_PORT:-29500}                # their rendezvous port when more than one

. "$ROOT/novelkit/launch.sh"

launch_each "$ROOT/Baichuan-Embedding/embed.py" build --model_path "$MODEL_PATH" --data "$DATA" --index "$INDEX_DIR" \
  --max_chars "$MAX_CHARS" --batch_size "$BATCH" ${POOLING:+--pooling "$POOLING"} ${LAYER:+--layer "$LAYER"} \
  ${MAX_LENGTH:+--max_length "$MAX_LENGTH"} ${INDEX_TYPE:+--index_type "$INDEX_TYPE"} "$@"
