#!/usr/bin/env bash
# A one-machine Slurm cluster for the tests (tests/test_slurm.py): munged, slurmctld and slurmd,
# with this machine's CPUs and memory, everything (config, keys, state, logs) in one folder.
#
#   tests/cluster/start-slurm.sh [DIR]      # DIR: $IAT_SLURM_DIR, else /tmp/iat-slurm
#   export SLURM_CONF=DIR/slurm.conf        # then sbatch / squeue / scancel talk to it
#   tests/cluster/stop-slurm.sh [DIR]
#
# Idempotent: when the cluster of DIR already answers with its node idle, nothing is done; else
# stale daemons of DIR are stopped and everything is started afresh. Needs root (slurmd starts the
# jobs) and Debian's slurm-wlm + munge (Slurm 22.05). Ports: $IAT_SLURM_PORT (slurmctld, default
# 6817) and the next one (slurmd). Every wait is bounded; exit status 1 with the log's tail when
# the cluster does not come up within $IAT_SLURM_START_TIMEOUT seconds (60).
set -euo pipefail

DIR="$(readlink -m "${1:-${IAT_SLURM_DIR:-/tmp/iat-slurm}}")"
PORT="${IAT_SLURM_PORT:-6817}"
TIMEOUT="${IAT_SLURM_START_TIMEOUT:-60}"
NODE="$(hostname -s)"
export SLURM_CONF="$DIR/slurm.conf"

for tool in munged slurmctld slurmd sinfo scontrol; do
  command -v "$tool" >/dev/null || { echo "error: $tool is not installed (apt-get install slurm-wlm munge)" >&2; exit 1; }
done
[[ "$(id -u)" == 0 ]] || { echo "error: run as root: slurmd starts jobs as their user" >&2; exit 1; }

# slurm/*.sh hand the node name to the ranks as MASTER_ADDR (scontrol show hostnames).
getent hosts "$NODE" >/dev/null \
  || echo "warning: the node name $NODE does not resolve; jobs' ranks meet at it (/etc/hosts)" >&2

node_state() { timeout 10 sinfo -h -n "$NODE" -o %t 2>/dev/null | head -1; }

if [[ -f "$SLURM_CONF" ]] && [[ "$(node_state)" =~ ^(idle|mix|alloc)$ ]]; then
  echo "slurm: already up ($SLURM_CONF)"
  exit 0
fi

"$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/stop-slurm.sh" "$DIR" >/dev/null 2>&1 || true
mkdir -p "$DIR/state" "$DIR/spool"
chmod 0755 "$DIR"

# munge: a private daemon, key and socket (the system's, if any, is left alone).
[[ -s "$DIR/munge.key" ]] || { umask 077; head -c 128 /dev/urandom >"$DIR/munge.key"; }
chmod 0400 "$DIR/munge.key"
munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" \
  --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed"

# This machine's CPUs (those this shell may use) and 90% of its memory, so that slurmd never
# finds less than configured (which would drain the node).
cpus="$(nproc)"
memory_mb="$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
cat >"$SLURM_CONF" <<CONF
# Written by tests/cluster/start-slurm.sh: a one-machine cluster for the tests.
ClusterName=iat-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# No cgroups: containers and CI machines seldom delegate them.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=5
MinJobAge=600
SlurmdTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=test Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF

slurmctld -c
slurmd -N "$NODE"

deadline=$((SECONDS + TIMEOUT))
while (( SECONDS < deadline )); do
  state="$(node_state || true)"
  case "$state" in
    idle) echo "slurm: up, node $NODE with $cpus CPUs and $memory_mb MB ($SLURM_CONF)"; exit 0 ;;
    down*|drain*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done
echo "error: the Slurm node did not become idle within $TIMEOUT s (state: ${state:-none})" >&2
tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 2>/dev/null || true
exit 1
