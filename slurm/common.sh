# The part slurm/train.sh and slurm/eval.sh share, sourced by them from the repository root.
# Every variable below can be overridden from the environment.

DATA="${DATA:-$HOME/data/imagenet}"
BATCH="${BATCH:-32}"  # images per GPU (train.sh: and per data-server batch)
ARCH="${ARCH:-ResNet}"
DEPTH="${DEPTH:-152}"
# Feature Denoising, Sec 5 and 6: epsilon 16 (pixels), in training and in evaluation.
ATTACK_EPSILON="${ATTACK_EPSILON:-16}"

# Rendezvous for distributed.py: the first node hosts rank 0. Without a working scontrol,
# distributed.py expands the node list itself; the port (MASTER_PORT, unless given) is its
# decision too: it follows the job id, so that two jobs sharing a node do not collide.
export_master_addr() {
  local first
  if [[ -z "${MASTER_ADDR:-}" ]] && command -v scontrol >/dev/null \
    && first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | sed -n 1p)" \
    && [[ -n "$first" ]]; then
    export MASTER_ADDR="$first"
  fi
}

export_master_addr
echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes," \
  "rank 0 at ${MASTER_ADDR:-<from node list>}:${MASTER_PORT:-<from the job id>}"
