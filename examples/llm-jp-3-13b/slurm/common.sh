#!/usr/bin/env bash
# Shared by the sbatch scripts of this folder (sourced, not run).
# Everything a site may need to change is a variable with a default.

# Where the project lives and where runs, data and models are (relative paths in the
# recipes are resolved from WORK).
: "${REPO:=${SLURM_SUBMIT_DIR:-$PWD}}"
: "${WORK:=$REPO}"
: "${GPUS_PER_NODE:=8}"
: "${MASTER_PORT:=29500}"
: "${VLLM_PORT:=8001}"
: "${VLLM_STARTUP_TIMEOUT:=1800}"   # seconds for the server to load its model

# NCCL: defaults for InfiniBand clusters; override per site (see NCCL's environment docs).
: "${NCCL_SOCKET_IFNAME:=^lo,docker0}"
: "${NCCL_IB_HCA:=}"
: "${NCCL_DEBUG:=WARN}"
: "${NCCL_ASYNC_ERROR_HANDLING:=1}"
: "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"   # megatron-core overlaps TP comms with this
export NCCL_SOCKET_IFNAME NCCL_DEBUG NCCL_ASYNC_ERROR_HANDLING CUDA_DEVICE_MAX_CONNECTIONS
if [[ -n "$NCCL_IB_HCA" ]]; then export NCCL_IB_HCA; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

LOG_DIR="$WORK/logs/${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID:-local}"
mkdir -p "$LOG_DIR"

log() { echo "[$(date '+%F %T')] $*" >&2; }

# The allocation's hosts, one per line (first = rendezvous host).
job_nodes() { scontrol show hostnames "$SLURM_JOB_NODELIST"; }

# wait_for_server URL PID: poll URL/v1/models until it answers, the server dies, or
# VLLM_STARTUP_TIMEOUT passes.
wait_for_server() {
  local url=$1 pid=$2 waited=0
  until curl -sf "$url/v1/models" >/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "vLLM server exited before it was ready; see $LOG_DIR"
      return 1
    fi
    if ((waited >= VLLM_STARTUP_TIMEOUT)); then
      log "vLLM server not ready at $url after ${VLLM_STARTUP_TIMEOUT}s"
      return 1
    fi
    sleep 10
    waited=$((waited + 10))
  done
  log "vLLM server ready at $url"
}

# start_vllm NODE LOGNAME ARGS...: `vllm serve ARGS` on NODE in the background (one srun
# step of one task); sets VLLM_PID and VLLM_URL.
start_vllm() {
  local node=$1 name=$2
  shift 2
  srun --nodes=1 --ntasks=1 --nodelist="$node" --overlap --kill-on-bad-exit=0 \
    vllm serve "$@" --host 0.0.0.0 --port "$VLLM_PORT" >"$LOG_DIR/$name.log" 2>&1 &
  # shellcheck disable=SC2034  # read by the scripts that source this file
  VLLM_PID=$!
  # shellcheck disable=SC2034
  VLLM_URL="http://$node:$VLLM_PORT"
}

# resume_load SAVE_DIR FIRST_LOAD: a requeued job resumes from SAVE_DIR's latest checkpoint.
resume_load() {
  if [[ -f "$1/latest_checkpointed_iteration.txt" ]]; then echo "$1"; else echo "$2"; fi
}

# signal_workers NODES: SIGTERM to the training processes themselves (the children of
# torchrun) on the first NODES nodes. Not to torchrun: it would forward the signal and
# SIGKILL its workers 30 s later, before a 13B checkpoint is saved.
signal_workers() {
  # shellcheck disable=SC2016  # the command substitution runs on each node
  srun --overlap --nodes="$1" --ntasks="$1" --ntasks-per-node=1 \
    --nodelist="$(job_nodes | head -n "$1" | paste -sd,)" \
    bash -c 'pkill -TERM -P "$(pgrep -d, -u "$USER" -x torchrun)"' || true
}

# run_trainer NODES SCRIPT ARGS...: torchrun on NODES nodes (the first NODES of the job),
# rendezvous at the first one. SIGTERM (preemption, `--signal=B:TERM@120`) is forwarded to
# every training process, which saves a checkpoint and exits; the job is then requeued.
run_trainer() {
  local nodes=$1 script=$2
  shift 2
  local master
  master=$(job_nodes | head -n 1)
  srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    --nodelist="$(job_nodes | head -n "$nodes" | paste -sd,)" \
    torchrun --nnodes "$nodes" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$master:$MASTER_PORT" --rdzv-id "${SLURM_JOB_ID:-0}" \
    "$REPO/$script" "$@" --nnodes "$nodes" --nproc-per-node "$GPUS_PER_NODE" \
    >"$LOG_DIR/train.log" 2>&1 &
  TRAINER_PID=$!
  TRAINER_NODES=$nodes
  trap 'log "SIGTERM: asking the trainer to save and exit"; signal_workers "$TRAINER_NODES"' TERM
  local status=0
  wait "$TRAINER_PID" || status=$?
  # `wait` returns early when a trapped signal arrives: wait again for the save to finish.
  if kill -0 "$TRAINER_PID" 2>/dev/null; then wait "$TRAINER_PID" || status=$?; fi
  return "$status"
}
