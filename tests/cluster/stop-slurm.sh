#!/usr/bin/env bash
# Stops the cluster of tests/cluster/start-slurm.sh (slurmd, slurmctld, munged of DIR) and waits,
# at most 20 s, for each daemon to end. The folder and its logs stay, for inspection.
#
#   tests/cluster/stop-slurm.sh [DIR]      # DIR: $IAT_SLURM_DIR, else /tmp/iat-slurm
set -uo pipefail

DIR="$(readlink -m "${1:-${IAT_SLURM_DIR:-/tmp/iat-slurm}}")"

stop() {  # pid file: TERM the daemon it names, KILL it after 20 s
  local pid
  pid="$(cat "$1" 2>/dev/null)" || return 0
  [[ "$pid" =~ ^[0-9]+$ ]] && kill "$pid" 2>/dev/null || { rm -f "$1"; return 0; }
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$1"; return 0; }
    sleep 0.2
  done
  kill -KILL "$pid" 2>/dev/null
  rm -f "$1"
}

for daemon in slurmd slurmctld munged; do
  stop "$DIR/$daemon.pid"
done
echo "slurm: stopped ($DIR)"
