#!/usr/bin/env bash
# Numbers and plots before and after training; each writes report.md, report.json and PNGs to OUTPUT_DIR.
#   bash Baichuan-Analysis/run_analysis.sh data    # DATA: lengths in tokens, MAX_LENGTH truncation, duplicates
#   bash Baichuan-Analysis/run_analysis.sh model   # MODEL_PATH: parameters, LoRA, GPU memory per method
#   bash Baichuan-Analysis/run_analysis.sh logs    # RUNS: loss / eval loss / perplexity / learning-rate curves
# Override any variable from the environment, e.g.
#   MODEL_PATH=Baichuan-Analysis/configs/baichuan2-7b.json BATCH=8 MAX_LENGTH=1024 bash Baichuan-Analysis/run_analysis.sh model
# Extra arguments go to the Python script (see analyze_<what>.py --help).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

WHAT=${1:?usage: run_analysis.sh data|model|logs [extra flags]}
shift
MODEL_PATH=${MODEL_PATH:-}                          # empty: the embedded default (tokenizer for data, model for model)
DATA=${DATA:-$ROOT/data_examples/sft/train.jsonl}   # dataset file, or novel .txt / folder of .txt
TEMPLATE=${TEMPLATE:-}                              # chat template for sample lengths; empty: the model's own
MAX_LENGTHS=${MAX_LENGTHS:-128,256,512,1024,2048,4096,8192}  # candidate MAX_LENGTHs for the truncation table
TOKEN_EVERY=${TOKEN_EVERY:-1}                       # tokenize 1 sample / chapter in N (for huge corpora)
BATCH=${BATCH:-4}                                   # micro-batch per GPU for the memory estimate
MAX_LENGTH=${MAX_LENGTH:-512}
NUM_GPUS=${NUM_GPUS:-1}
LORA_R=${LORA_R:-8}
LORA_TARGET=${LORA_TARGET:-auto}                    # auto (W_pack on Baichuan) | all | q_proj,v_proj,...
RUNS=${RUNS:-output/lora}                           # space-separated run folders / event files / trainer_state.json
OUTPUT_DIR=${OUTPUT_DIR:-output/analysis/$WHAT}

case "$WHAT" in
  data) python "$ROOT/Baichuan-Analysis/analyze_data.py" --data "$DATA" --model_path "$MODEL_PATH" \
          --template "$TEMPLATE" --max_lengths "$MAX_LENGTHS" --token_every "$TOKEN_EVERY" --output_dir "$OUTPUT_DIR" "$@" ;;
  model) python "$ROOT/Baichuan-Analysis/analyze_model.py" --model_path "$MODEL_PATH" --batch "$BATCH" \
           --max_length "$MAX_LENGTH" --num_gpus "$NUM_GPUS" --lora_r "$LORA_R" --lora_target "$LORA_TARGET" \
           --output_dir "$OUTPUT_DIR" "$@" ;;
  logs) read -r -a runs <<< "$RUNS"
        python "$ROOT/Baichuan-Analysis/analyze_logs.py" --runs "${runs[@]}" --output_dir "$OUTPUT_DIR" "$@" ;;
  *) echo "error: unknown analysis '$WHAT': expected data, model or logs" >&2; exit 2 ;;
esac
