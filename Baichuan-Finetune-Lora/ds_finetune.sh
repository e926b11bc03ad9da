#!/usr/bin/env bash
# LoRA SFT. Every variable below can be overridden from the environment, e.g.
#   MODEL_PATH=/models/Baichuan2-7B-Base DATA=my.jsonl LORA_R=16 bash Baichuan-Finetune-Lora/ds_finetune.sh
# Extra arguments go to finetune.py (any transformers TrainingArguments flag).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

MODEL_PATH=${MODEL_PATH:-}                          # empty: the embedded default model
DATA=${DATA:-$ROOT/data_examples/sft/train.jsonl}   # any supported format
DEV=${DEV-$ROOT/data_examples/sft/dev.jsonl}       # eval loss + ROUGE during training; empty: none
OUTPUT_DIR=${OUTPUT_DIR:-output/lora}               # adapter + checkpoints; reruns resume from here
TEMPLATE=${TEMPLATE:-}                              # empty: the model's own
MAX_LENGTH=${MAX_LENGTH:-512}
LORA_R=${LORA_R:-8}
LORA_ALPHA=${LORA_ALPHA:-16}
LORA_DROPOUT=${LORA_DROPOUT:-0.05}
LORA_TARGET=${LORA_TARGET:-auto}                    # auto (W_pack on Baichuan) | all | q_proj,v_proj,...
EPOCHS=${EPOCHS:-3}
LR=${LR:-2e-4}
BATCH=${BATCH:-4}
GRAD_ACCUM=${GRAD_ACCUM:-1}
# bf16 mixed precision; default: true on a GPU that supports it, false elsewhere
BF16=${BF16:-$(python -c 'import torch as t; print(str(t.cuda.is_available() and t.cuda.is_bf16_supported()).lower())')}
EVAL_STEPS=${EVAL_STEPS:-0.2}                       # evaluate (and save) every N steps; below 1: that share of all
EVAL_SAMPLES=${EVAL_SAMPLES:-16}                    # dev samples generated for ROUGE at each evaluation; 0: loss only
BEST_METRIC=${BEST_METRIC:-auto}                    # output = the best checkpoint by: auto (rouge-l; the dev loss
                                                    # with EVAL_SAMPLES=0), loss, rouge-1/2/l, ner_f1; last: last step
PATIENCE=${PATIENCE:-3}                             # stop after this many evaluations without a better one; 0: never
DS_CONFIG=${DS_CONFIG:-}                            # ds_zero{2,3}[_offload].json beside this script; empty: none
NUM_GPUS=${NUM_GPUS:-}                              # GPUs per node (empty: all); without a GPU: CPU processes
HOSTFILE=${HOSTFILE:-}                              # several nodes: one "host slots=GPUs" line each (README)
MASTER_PORT=${MASTER_PORT:-29500}                   # rendezvous port on the first node

. "$ROOT/novelkit/launch.sh"   # deepspeed launcher on GPUs, torchrun or python on a CPU
launch "$ROOT/Baichuan-Finetune-Lora/finetune.py" \
  --model_path "$MODEL_PATH" --data "$DATA" --dev "$DEV" --output_dir "$OUTPUT_DIR" --template "$TEMPLATE" \
  --max_length "$MAX_LENGTH" --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --lora_dropout "$LORA_DROPOUT" \
  --lora_target "$LORA_TARGET" --num_train_epochs "$EPOCHS" --learning_rate "$LR" \
  --per_device_train_batch_size "$BATCH" --per_device_eval_batch_size "$BATCH" \
  --gradient_accumulation_steps "$GRAD_ACCUM" --bf16 "$BF16" --lr_scheduler_type cosine --warmup_steps 0.05 \
  --logging_steps 5 --eval_strategy steps --eval_steps "$EVAL_STEPS" --eval_samples "$EVAL_SAMPLES" \
  --best_metric "$BEST_METRIC" --patience "$PATIENCE" \
  --save_strategy steps --save_steps "$EVAL_STEPS" --save_total_limit 2 --report_to tensorboard \
  "$@"
