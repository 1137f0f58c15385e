#!/usr/bin/env bash
# Adversarial training on Slurm: one data server per node, one training process per GPU.
# Submit from the repository root, e.g. 4 nodes x 8 GPUs:
#   mkdir -p logs && sbatch --nodes=4 slurm/train.sh [extra main.py flags]
# Every variable below can be overridden from the environment: DATA=/ssd/imagenet sbatch ...
#SBATCH --job-name=adv-train
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=200G
#SBATCH --time=72:00:00
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
: "${SLURM_JOB_ID:?run this script with sbatch, or srun inside salloc}"

DATA="${DATA:-$HOME/data/imagenet}"
BATCH="${BATCH:-32}"  # images per GPU and per data-server batch
ARCH="${ARCH:-ResNet}"
DEPTH="${DEPTH:-152}"
# Feature Denoising, Sec 5: PGD training attacker, 30 iterations, epsilon 16 (pixels);
# Sec 6.1: step size 1.
ATTACK_ITER="${ATTACK_ITER:-30}"
ATTACK_EPSILON="${ATTACK_EPSILON:-16}"
ATTACK_STEP_SIZE="${ATTACK_STEP_SIZE:-1}"
DATA_CPUS="${DATA_CPUS:-60}"  # CPUs of each node's data server (decoding, augmentation)
# Run directory; the default is main.py's own (train_log/PGD-...), which stays the same from one
# job to the next, so that resubmitting the script resumes from the latest checkpoint.
LOGDIR="${LOGDIR:-}"

# sbatch runs a copy of this script, so its own path may not lead back to the repository.
cd_repo_root() {
  local here candidate
  here="$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"
  for candidate in "${REPO_ROOT:-}" "$here/.." "${SLURM_SUBMIT_DIR:-}" "${SLURM_SUBMIT_DIR:-}/.."; do
    if [[ -n "$candidate" && -f "$candidate/main.py" ]]; then
      cd "$candidate"
      return
    fi
  done
  echo "error: cannot find the repository (main.py); set REPO_ROOT or sbatch from it" >&2
  exit 1
}

# Rendezvous for distributed.py: the first node hosts rank 0; the port follows the job id.
# Without a working scontrol, distributed.py expands the node list itself.
export_rendezvous() {
  local first
  if [[ -z "${MASTER_ADDR:-}" ]] && command -v scontrol >/dev/null \
    && first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | sed -n 1p)" \
    && [[ -n "$first" ]]; then
    export MASTER_ADDR="$first"
  fi
  export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
}

stop_data_servers() {
  kill "$DATA_PID" 2>/dev/null || true
  wait "$DATA_PID" 2>/dev/null || true
}

cd_repo_root
export_rendezvous
mkdir -p logs
echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes, rank 0 at ${MASTER_ADDR:-<from node list>}:$MASTER_PORT"

# --overlap: the servers share the nodes with the training step instead of holding them. Each
# node's server serves its share of every epoch (--hosts, --host-index: its node's number).
srun --overlap --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 \
  --cpus-per-task="$DATA_CPUS" --output="logs/data-%j.%N.log" \
  bash -c 'exec "$@" --hosts "$SLURM_NNODES" --host-index "$SLURM_NODEID"' serve-data \
  python third_party/serve-data.py --data "$DATA" --batch "$BATCH" &
DATA_PID=$!
trap stop_data_servers EXIT

srun --kill-on-bad-exit=1 \
  python main.py --data "$DATA" --batch "$BATCH" \
  --attack-iter "$ATTACK_ITER" --attack-epsilon "$ATTACK_EPSILON" \
  --attack-step-size "$ATTACK_STEP_SIZE" \
  --arch "$ARCH" -d "$DEPTH" ${LOGDIR:+--logdir "$LOGDIR"} "$@"
