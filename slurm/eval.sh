#!/usr/bin/env bash
# White-box evaluation on Slurm: every GPU attacks its share of the validation set.
# Submit from the repository root, e.g. 2 nodes x 8 GPUs against 100-step PGD:
#   mkdir -p logs && CKPT=train_log/PGD-ResNet152-Batch32-32GPUs-iter30-epsilon16.0-step1.0/checkpoint-epoch0110.pt \
#     sbatch --nodes=2 slurm/eval.sh
# Every variable below can be overridden from the environment; extra arguments go to main.py.
#SBATCH --job-name=adv-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=200G
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
: "${SLURM_JOB_ID:?run this script with sbatch, or srun inside salloc}"
: "${CKPT:?set CKPT to the checkpoint to evaluate}"

DATA="${DATA:-$HOME/data/imagenet}"
BATCH="${BATCH:-32}"  # images per GPU
ARCH="${ARCH:-ResNet}"
DEPTH="${DEPTH:-152}"
# Feature Denoising, Sec 6: targeted PGD, epsilon 16; 10, 100 or 1000 iterations (0: clean).
ATTACK_ITER="${ATTACK_ITER:-100}"
ATTACK_EPSILON="${ATTACK_EPSILON:-16}"

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

cd_repo_root
export_rendezvous
echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes, rank 0 at ${MASTER_ADDR:-<from node list>}:$MASTER_PORT"

srun --kill-on-bad-exit=1 \
  python main.py --eval --load "$CKPT" --data "$DATA" --batch "$BATCH" \
  --attack-iter "$ATTACK_ITER" --attack-epsilon "$ATTACK_EPSILON" \
  --arch "$ARCH" -d "$DEPTH" "$@"
