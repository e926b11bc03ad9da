# Sourced by every ds_finetune.sh: `launch SCRIPT ARGS...` starts a training script the one way this machine allows.
#   GPU here, or HOSTFILE given: the deepspeed launcher, NUM_GPUS per node (empty: all), MASTER_PORT, and HOSTFILE
#     ("host slots=N" lines; the launcher reaches the other nodes over passwordless ssh, see the README).
#   No GPU: DS_CONFIG given: torchrun with NUM_GPUS (default 1) CPU processes, DeepSpeed over gloo; else plain python.
# DS_CONFIG, when given, reaches the script as --deepspeed DS_CONFIG.
launch() {
  local script=$1 ds=()
  shift
  [ -n "${DS_CONFIG:-}" ] && ds=(--deepspeed "$DS_CONFIG")
  if [ -n "${HOSTFILE:-}" ] || python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    # --no_local_rank: the scripts read LOCAL_RANK from the environment like under torchrun
    deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} \
      --master_port "${MASTER_PORT:-29500}" --no_local_rank "$script" "$@" "${ds[@]}"
  elif [ -n "${DS_CONFIG:-}" ]; then
    # --use_cpu: else accelerate finds no GPU backend and every process believes it is alone (wrong batch sizes)
    torchrun --nproc_per_node "${NUM_GPUS:-1}" --master_port "${MASTER_PORT:-29500}" "$script" "$@" --use_cpu true \
      "${ds[@]}"
  else
    python "$script" "$@"
  fi
}

# Sourced by every run_predict.sh: `launch_each SCRIPT ARGS...` starts one process per GPU (NUM_GPUS; empty: every GPU
# here, 1 without a GPU), under torchrun when more than one; prediction splits its records across them.
launch_each() {
  local n=${NUM_GPUS:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
  if [ "$n" -gt 1 ]; then
    torchrun --nproc_per_node "$n" --master_port "${MASTER_PORT:-29500}" "$@"
  else
    python "$@"
  fi
}
