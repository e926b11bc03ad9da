#!/usr/bin/env bash
# Preference tuning (DPO by default; SimPO needs no reference) on top of an SFT model or adapter, e.g.
#   MODEL_PATH=/models/Baichuan2-7B-Base ADAPTER=output/lora DATA=output/web_demo/ratings.sqlite BY=文风 \
#     bash Baichuan-Finetune-DPO/ds_finetune.sh
# Extra arguments go to finetune.py (any transformers TrainingArguments flag).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

MODEL_PATH=${MODEL_PATH:-}                               # the SFT model, or ADAPTER's base; empty: embedded default
ADAPTER=${ADAPTER:-}                                     # SFT LoRA adapter to continue; empty: a new adapter
FINETUNING=${FINETUNING:-lora}                           # lora | full | qlora
DATA=${DATA:-$ROOT/data_examples/preference/train.jsonl} # {prompt, chosen, rejected} file, or ratings.sqlite
DEV=${DEV-$ROOT/data_examples/preference/dev.jsonl}      # dev pairs: eval loss, reward margin; empty: none
BY=${BY:-overall}                                        # ratings.sqlite: overall | 逻辑性 | 背景知识 | 文风
OUTPUT_DIR=${OUTPUT_DIR:-output/dpo}                     # adapter (or model) + checkpoints; reruns resume
TEMPLATE=${TEMPLATE:-}                                   # empty: the model's own
LOSS=${LOSS:-dpo}                                        # dpo | simpo
BETA=${BETA:-0.1}                                        # DPO 0.1; SimPO ~2.0
SIMPO_GAMMA=${SIMPO_GAMMA:-1.0}                          # SimPO's target reward margin
MAX_LENGTH=${MAX_LENGTH:-512}
LORA_R=${LORA_R:-8}
LORA_ALPHA=${LORA_ALPHA:-16}
LORA_TARGET=${LORA_TARGET:-auto}                         # auto (W_pack on Baichuan) | all | q_proj,v_proj,...
EPOCHS=${EPOCHS:-3}
LR=${LR:-5e-5}                                           # LoRA; full fine-tuning wants ~5e-7
BATCH=${BATCH:-4}                                        # pairs per device (twice as many rows)
GRAD_ACCUM=${GRAD_ACCUM:-1}
BF16=${BF16:-$(python -c 'import torch as t; print(str(t.cuda.is_available() and t.cuda.is_bf16_supported()).lower())')}
GRAD_CKPT=${GRAD_CKPT:-false}                            # recompute activations in backward: less memory, slower
EVAL_STEPS=${EVAL_STEPS:-0.2}                            # evaluate (and save) every N steps; below 1: share of all
BEST_METRIC=${BEST_METRIC:-auto}                         # auto = loss: output the lowest dev loss; last: last step
PATIENCE=${PATIENCE:-3}                                  # stop after this many evaluations without a better one
DS_CONFIG=${DS_CONFIG:-}                                 # ds_zero2[_offload].json beside this script; empty: none
NUM_GPUS=${NUM_GPUS:-}                                   # GPUs per node (empty: all); without a GPU: CPU processes
HOSTFILE=${HOSTFILE:-}                                   # several nodes: one "host slots=GPUs" line each (README)
MASTER_PORT=${MASTER_PORT:-29500}                        # rendezvous port on the first node

. "$ROOT/novelkit/launch.sh"   # deepspeed launcher on GPUs, torchrun or python on a CPU
launch "$ROOT/Baichuan-Finetune-DPO/finetune.py" \
  --model_path "$MODEL_PATH" --adapter "$ADAPTER" --finetuning "$FINETUNING" --data "$DATA" --dev "$DEV" --by "$BY" \
  --output_dir "$OUTPUT_DIR" --template "$TEMPLATE" --loss "$LOSS" --beta "$BETA" --simpo_gamma "$SIMPO_GAMMA" \
  --max_length "$MAX_LENGTH" --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --lora_target "$LORA_TARGET" \
  --num_train_epochs "$EPOCHS" --learning_rate "$LR" \
  --per_device_train_batch_size "$BATCH" --per_device_eval_batch_size "$BATCH" \
  --gradient_accumulation_steps "$GRAD_ACCUM" --bf16 "$BF16" --gradient_checkpointing "$GRAD_CKPT" \
  --lr_scheduler_type cosine --warmup_steps 0.1 --logging_steps 5 \
  --eval_strategy steps --eval_steps "$EVAL_STEPS" --best_metric "$BEST_METRIC" --patience "$PATIENCE" \
  --save_strategy steps --save_steps "$EVAL_STEPS" --save_total_limit 2 --report_to tensorboard \
  "$@"
