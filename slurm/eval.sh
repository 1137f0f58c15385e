#!/usr/bin/env bash
# White-box evaluation on Slurm: every GPU attacks its share of the validation set.
# Submit from the repository root, e.g. 2 nodes x 8 GPUs against 100-step PGD:
#   mkdir -p logs && CKPT=train_log/PGD-ResNet152-Batch32-32GPUs-iter30-epsilon16.0-step1.0/checkpoint-epoch0110.pt \
#     sbatch --nodes=2 slurm/eval.sh
# Every variable below and in slurm/common.sh can be overridden from the environment; extra
# arguments go to main.py.
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

# Feature Denoising, Sec 6: targeted PGD, epsilon 16; 10, 100 or 1000 iterations (0: clean).
ATTACK_ITER="${ATTACK_ITER:-100}"

# sbatch runs a copy of this script, so its own path may not lead back to the repository.
here="$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"
for root in "${REPO_ROOT:-}" "$here/.." "${SLURM_SUBMIT_DIR:-}" "${SLURM_SUBMIT_DIR:-}/.." ""; do
  [[ -n "$root" && -f "$root/main.py" && -f "$root/slurm/common.sh" ]] && break
done
cd "${root:?cannot find the repository (main.py); set REPO_ROOT or sbatch from it}"
source slurm/common.sh

srun --kill-on-bad-exit=1 \
  python main.py --eval --load "$CKPT" --data "$DATA" --batch "$BATCH" \
  --attack-iter "$ATTACK_ITER" --attack-epsilon "$ATTACK_EPSILON" \
  --arch "$ARCH" -d "$DEPTH" "$@"
