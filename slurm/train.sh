#!/usr/bin/env bash
# Adversarial training on Slurm: one data server per node, one training process per GPU.
# Submit from the repository root, e.g. 4 nodes x 8 GPUs:
#   mkdir -p logs && sbatch --nodes=4 slurm/train.sh [extra main.py flags]
# Every variable below and in slurm/common.sh can be overridden from the environment:
# DATA=/ssd/imagenet sbatch ...
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

# Feature Denoising, Sec 5: PGD training attacker, 30 iterations, epsilon 16 (pixels);
# Sec 6.1: step size 1.
ATTACK_ITER="${ATTACK_ITER:-30}"
ATTACK_STEP_SIZE="${ATTACK_STEP_SIZE:-1}"
DATA_CPUS="${DATA_CPUS:-60}"  # CPUs of each node's data server (decoding, augmentation)
# Run directory; the default is main.py's own (train_log/PGD-...), which stays the same from one
# job to the next, so that resubmitting the script resumes from the latest checkpoint.
LOGDIR="${LOGDIR:-}"

# sbatch runs a copy of this script, so its own path may not lead back to the repository.
here="$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"
for root in "${REPO_ROOT:-}" "$here/.." "${SLURM_SUBMIT_DIR:-}" "${SLURM_SUBMIT_DIR:-}/.." ""; do
  [[ -n "$root" && -f "$root/main.py" && -f "$root/slurm/common.sh" ]] && break
done
cd "${root:?cannot find the repository (main.py); set REPO_ROOT or sbatch from it}"
source slurm/common.sh

stop_data_servers() {
  kill "$DATA_PID" 2>/dev/null || true
  wait "$DATA_PID" 2>/dev/null || true
}

mkdir -p logs

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
