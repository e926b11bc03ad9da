# Sourced by every ds_finetune.sh: `launch SCRIPT ARGS...` starts a training script the one way this machine allows.
#   Several GPUs (NUM_GPUS per node; empty: all), or HOSTFILE given: the deepspeed launcher, MASTER_PORT, and HOSTFILE
#     ("host slots=N" lines; the launcher reaches the other nodes over passwordless ssh, see the README).
#   One GPU: the script itself, in the environment the deepspeed launcher gives its one process (the launcher's own
#     two Python starts cost seconds before the first step).
#   No GPU: DS_CONFIG given: torchrun with NUM_GPUS (default 1) CPU processes, DeepSpeed over gloo; else plain python.
# DS_CONFIG, when given, reaches the script as --deepspeed DS_CONFIG.
launch() {
  local script=$1 ds=() gpus
  shift
  [ -n "${DS_CONFIG:-}" ] && ds=(--deepspeed "$DS_CONFIG")
  gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
  if [ -n "${HOSTFILE:-}" ] || { [ "$gpus" -gt 0 ] && [ "${NUM_GPUS:-$gpus}" -gt 1 ]; }; then
    # --no_local_rank: the scripts read LOCAL_RANK from the environment like under torchrun
    deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} \
      --master_port "${MASTER_PORT:-29500}" --no_local_rank "$script" "$@" "${ds[@]}"
  elif [ "$gpus" -gt 0 ]; then
    CUDA_VISIBLE_DEVICES=$(echo "${CUDA_VISIBLE_DEVICES:-0}" | cut -d, -f1) MASTER_ADDR=127.0.0.1 \
      MASTER_PORT="${MASTER_PORT:-29500}" WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 LOCAL_SIZE=1 CROSS_RANK=0 CROSS_SIZE=1 \
      python -u "$script" "$@" "${ds[@]}"
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
