#!/usr/bin/env bash
# Domain pretraining on novels. Continue MODEL_PATH (empty: the embedded default), or train from scratch from
# MODEL_CONFIG with a tokenizer trained on the corpus. Override any variable from the environment, e.g.
#   MODEL_PATH=/models/Baichuan2-7B-Base CORPUS=/data/novels EVAL_BOOKS=异世邪君 DS_CONFIG=Baichuan-Pretrain/ds_zero3.json NUM_GPUS=8 \
#     bash Baichuan-Pretrain/ds_finetune.sh --bf16 true --gradient_checkpointing true
#   MODEL_CONFIG=Baichuan-Pretrain/configs/babyllama.json VOCAB_SIZE=16000 bash Baichuan-Pretrain/ds_finetune.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

MODEL_PATH=${MODEL_PATH:-}                       # model to continue; empty: the embedded default
MODEL_CONFIG=${MODEL_CONFIG:-}                   # from scratch: e.g. $ROOT/Baichuan-Pretrain/configs/babyllama.json
VOCAB_SIZE=${VOCAB_SIZE:-8000}                   # from scratch: SentencePiece vocabulary trained on CORPUS
CORPUS=${CORPUS:-$ROOT/data_examples/novels}     # folder of .txt novels (any encoding) or {text}/{name,text} JSONL
EVAL_BOOKS=${EVAL_BOOKS-xingchen_ke}                    # books held out whole for evaluation (file names without .txt)
EVAL_FRACTION=${EVAL_FRACTION:-0.1}              # without EVAL_BOOKS: share of blocks held out
CLEAN_PATTERNS=${CLEAN_PATTERNS:-}               # file of extra boilerplate regexes, one per line
MAX_LENGTH=${MAX_LENGTH:-2048}
OUTPUT_DIR=${OUTPUT_DIR:-output/pretrain}        # checkpoints + final model; reruns resume from here
EPOCHS=${EPOCHS:-1}
BEST_METRIC=${BEST_METRIC:-auto}                 # auto: output the lowest held-out loss's model; last: the last
PATIENCE=${PATIENCE:-3}                          # stop after this many evaluations without a lower one; 0: never
LR=${LR:-3e-4}
BATCH=${BATCH:-1}
GRAD_ACCUM=${GRAD_ACCUM:-1}
DS_CONFIG=${DS_CONFIG:-}                         # ds_zero{2,3}[_offload].json beside this script; empty: none
NUM_GPUS=${NUM_GPUS:-}                           # GPUs per node (empty: all); without a GPU: CPU processes
HOSTFILE=${HOSTFILE:-}                           # several nodes: one "host slots=GPUs" line each (README)
MASTER_PORT=${MASTER_PORT:-29500}                # rendezvous port on the first node

. "$ROOT/novelkit/launch.sh"   # deepspeed launcher on GPUs, torchrun or python on a CPU
launch "$ROOT/Baichuan-Pretrain/pretrain.py" \
  --model_path "$MODEL_PATH" --model_config "$MODEL_CONFIG" --vocab_size "$VOCAB_SIZE" --corpus "$CORPUS" \
  --eval_books "$EVAL_BOOKS" --eval_fraction "$EVAL_FRACTION" --clean_patterns "$CLEAN_PATTERNS" \
  --max_length "$MAX_LENGTH" --output_dir "$OUTPUT_DIR" --num_train_epochs "$EPOCHS" --learning_rate "$LR" \
  --per_device_train_batch_size "$BATCH" --per_device_eval_batch_size "$BATCH" \
  --gradient_accumulation_steps "$GRAD_ACCUM" --lr_scheduler_type cosine --warmup_steps 0.02 --weight_decay 0.1 \
  --logging_steps 10 --eval_strategy steps --eval_steps 200 --save_strategy steps --save_steps 200 \
  --best_metric "$BEST_METRIC" --patience "$PATIENCE" \
  --save_total_limit 3 --report_to tensorboard "$@"
