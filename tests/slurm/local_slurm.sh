#!/usr/bin/env bash
# A real SLURM on this one machine, for the `slurm` tests: slurmctld + two slurmd "nodes" (n1, n2) on localhost.
#
#   tests/slurm/local_slurm.sh start   install Debian's slurmctld/slurmd/slurm-client/munge if missing, write the
#                                      config, start munged, slurmctld and both slurmd, wait until the nodes are idle;
#                                      prints `export SLURM_CONF=...`. Idempotent: a running cluster with the same
#                                      config is left alone.
#   tests/slurm/local_slurm.sh stop    cancel every job, wait until none is left, shut the daemons down (and
#                                      munged, if this script started it)
#   tests/slurm/local_slurm.sh env     print `export SLURM_CONF=...`
#
# Needs root (Debian 12 as on CI; no systemd). Everything of the cluster lives under $SLURM_BASE
# (default /tmp/higgs-lora-slurm); /etc/slurm is not touched, clients find the cluster through SLURM_CONF.
#
# Why two nodes on one host: Debian's build allows several slurmd per host (MULTIPLE_SLURMD), so a `-N 2` job
# really gets two allocations with node ids 0 and 1, and the multi-node path of slurm/train.sbatch runs as on
# a cluster (everything on 127.0.0.1). Each node advertises this machine's cores: the nodes share them.
# KillWait and cred_expire are short so that a test's cancel or requeue takes seconds, not minutes: a requeued
# job may start again only after cred_expire seconds.
set -euo pipefail

BASE=${SLURM_BASE:-/tmp/higgs-lora-slurm}
CONF=$BASE/etc/slurm.conf
CPUS=$(nproc)
KILLWAIT=${SLURM_KILLWAIT:-20}
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-10}
NODES=(n1 n2)
export SLURM_CONF=$CONF

log() { echo "[local_slurm] $*" >&2; }
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local need=()
  [ -x /usr/sbin/slurmctld ] || need+=(slurmctld)
  [ -x /usr/sbin/slurmd ] || need+=(slurmd)
  [ -x /usr/bin/sbatch ] || need+=(slurm-client)
  [ -x /usr/sbin/munged ] || need+=(munge)
  [ ${#need[@]} -eq 0 ] && return 0
  log "installing ${need[*]}"
  apt-get update -qq
  # Without systemd the packages' postinst scripts cannot start the services: fine, this script starts them.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
      || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged --force
  touch "$BASE/run/munged.ours"   # so that `stop` stops only a munged this script started
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "munged did not come up (see /var/log/munge/munged.log)"
  return 1
}

# Writes the config; returns 0 when it changed (the daemons must then be restarted), 1 when it is the same.
write_conf() {
  local memkb mem tmp port=17000 node
  memkb=$(awk '/MemTotal/ {print $2}' /proc/meminfo)
  mem=$(( memkb / 1024 * 80 / 100 / ${#NODES[@]} ))   # MB per node, below what each slurmd detects
  tmp=$(mktemp)
  cat > "$tmp" <<CONF
# written by tests/slurm/local_slurm.sh: a test cluster of two slurmd on localhost
ClusterName=higgs-lora-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=$CRED_EXPIRE
MpiDefault=none
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
KillWait=$KILLWAIT
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$BASE/spool/ctld
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
CONF
  for node in "${NODES[@]}"; do
    port=$((port + 1))
    echo "NodeName=$node NodeHostname=localhost NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS RealMemory=$mem State=UNKNOWN" >> "$tmp"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$tmp"
  if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then rm -f "$tmp"; return 1; fi
  chmod 0644 "$tmp"
  mv "$tmp" "$CONF"
  return 0
}

running() {
  pid_alive "$BASE/run/slurmctld.pid" || return 1
  local node
  for node in "${NODES[@]}"; do pid_alive "$BASE/run/slurmd-$node.pid" || return 1; done
  scontrol ping >/dev/null 2>&1
}

nodes_ready() {
  local ready
  ready=$(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 ~ /^(idle|mix|alloc)$/ {print $1}' | sort -u | wc -l)
  [ "$ready" -eq "${#NODES[@]}" ]
}

# `scontrol shutdown` leaves running jobs alive (their slurmstepd retry forever), so cancel every job first.
stop_cluster() {
  local f p pids=()
  if pid_alive "$BASE/run/slurmctld.pid" && scontrol ping >/dev/null 2>&1; then
    if [ -n "$(squeue -h -o %A 2>/dev/null)" ]; then
      squeue -h -o %A | xargs -r scancel 2>/dev/null || true
      for _ in $(seq $(( (KILLWAIT + 20) * 5 ))); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
    fi
    scontrol shutdown >/dev/null 2>&1 || true
  fi
  for f in "$BASE"/run/slurmctld.pid "$BASE"/run/slurmd-*.pid; do [ -s "$f" ] && pids+=("$(cat "$f")"); done
  for p in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$p" 2>/dev/null; then log "daemon $p still alive: SIGTERM"; kill "$p" 2>/dev/null || true; sleep 1; fi
    if kill -0 "$p" 2>/dev/null; then log "daemon $p still alive: SIGKILL"; kill -9 "$p" 2>/dev/null || true; fi
  done
  rm -f "$BASE"/run/slurmctld.pid "$BASE"/run/slurmd-*.pid
}

stop_munge() {
  [ -f "$BASE/run/munged.ours" ] || return 0
  local p
  if [ -s /run/munge/munged.pid ]; then
    p=$(cat /run/munge/munged.pid)
    kill "$p" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$BASE/run/munged.ours"
}

start_cluster() {
  install_packages
  mkdir -p "$BASE"/etc "$BASE"/spool/ctld "$BASE"/log "$BASE"/run
  local changed=0 node
  if write_conf; then changed=1; fi
  start_munge
  if [ $changed = 0 ] && running; then
    log "already running ($CONF)"
  else
    stop_cluster
    log "starting slurmctld"
    slurmctld
    for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
    for node in "${NODES[@]}"; do
      mkdir -p "$BASE/spool/$node"
      log "starting slurmd $node"
      slurmd -N "$node"
    done
  fi
  for _ in $(seq 300); do nodes_ready && break; sleep 0.2; done
  if ! nodes_ready; then
    sinfo -N -l >&2 || true
    log "the nodes did not become idle; see $BASE/log"
    return 1
  fi
  echo "export SLURM_CONF=$CONF"
}

case "${1:-start}" in
  start) start_cluster ;;
  stop) stop_cluster; stop_munge ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 [start|stop|env]" >&2; exit 2 ;;
esac
