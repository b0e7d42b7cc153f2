#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying the slurm launcher and for CI.
#
#   slurm/local-cluster.sh up       install (once: apt-get) and start munged, slurmctld, slurmd; wait until the node is idle
#   slurm/local-cluster.sh down     stop the daemons this script started (by their pid files)
#   slurm/local-cluster.sh status   daemons and sinfo
#
# Idempotent: `up` on a running cluster with an unchanged config returns at once.
# State (config copy, spool, logs, pid files) lives in $SSL_BENCH_SLURM_DIR (default /tmp/ssl-bench-slurm);
# the config itself is installed where every SLURM client looks for it, /etc/slurm/slurm.conf.
# Needs root (or sudo): it installs packages and runs the daemons as root, as a single-user test cluster does.
set -euo pipefail

STATE=${SSL_BENCH_SLURM_DIR:-/tmp/ssl-bench-slurm}
CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)
MARK="# written by ssl-bench slurm/local-cluster.sh"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
say() { echo "local-cluster: $*"; }
die() { echo "local-cluster: error: $*" >&2; exit 1; }

alive() { local pid; pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sinfo >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} -eq 0 ] && return
    say "installing ${missing[*]} (apt-get)"
    as_root apt-get update -qq
    # No init system starts services in a container; keep the packages' scripts from trying (and failing).
    local policy=/usr/sbin/policy-rc.d added=0
    if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' | as_root tee $policy >/dev/null; as_root chmod +x $policy; added=1; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ $added = 1 ] && as_root rm -f $policy
    return 0
}

write_config() {
    local cpus mem_mb tmp
    cpus=$(nproc --all)
    # Leave 5% of memory to the system, so slurmd's check (configured <= real) always passes.
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)
    tmp=$(mktemp)
    cat > "$tmp" <<EOF
$MARK; state in $STATE
ClusterName=sslbench
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may restart after cred_expire seconds (default 120)
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
# finished jobs stay visible to scontrol for an hour (there is no accounting database for sacct)
MinJobAge=3600
KillWait=2
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$HOST CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    echo "$tmp"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    as_root mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge "$STATE/munge"
    if [ ! -s /etc/munge/munge.key ]; then as_root mungekey -c -f -k /etc/munge/munge.key; fi
    as_root chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge "$STATE/munge"
    as_root chmod 0700 /etc/munge; as_root chmod 0400 /etc/munge/munge.key; as_root chmod 0755 /run/munge
    as_root runuser -u munge -- /usr/sbin/munged --pid-file="$STATE/munge/munged.pid" --force
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
    die "munged did not start; see /var/log/munge/munged.log"
}

node_state() { sinfo -h -N -n "$HOST" -o %t 2>/dev/null | head -1; }

up() {
    install_packages
    as_root mkdir -p "$STATE"/{ctld,spool,log} /etc/slurm
    as_root chmod 0755 "$STATE"
    local new; new=$(write_config)
    local changed=0
    if ! cmp -s "$new" "$CONF" 2>/dev/null; then
        if [ -e "$CONF" ] && ! grep -q "^$MARK" "$CONF"; then
            rm -f "$new"; die "$CONF exists and was not written by this script; move it away to use the local cluster"
        fi
        as_root cp "$new" "$CONF"; as_root chmod 0644 "$CONF"; as_root cp "$new" "$STATE/slurm.conf"; changed=1
    fi
    rm -f "$new"
    start_munge
    if [ $changed = 1 ] && alive "$STATE/slurmctld.pid"; then
        say "config changed: restarting the daemons"
        stop_daemons
    fi
    if ! alive "$STATE/slurmctld.pid"; then as_root slurmctld; fi
    if ! alive "$STATE/slurmd.pid"; then as_root slurmd; fi
    local s=""
    for _ in $(seq 150); do
        s=$(node_state)
        case "$s" in
            idle|mix|alloc) break ;;
            down*|drain*|drng*|fail*) as_root scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.2
    done
    case "$s" in
        idle|mix|alloc) say "up: node $HOST $s; $(sinfo -h -o '%P %D nodes, %c CPUs' | head -1); state in $STATE" ;;
        *) die "node $HOST is '${s:-unreachable}' after 30 s; see $STATE/log/slurmctld.log and $STATE/log/slurmd.log" ;;
    esac
}

stop_daemons() {
    local f
    for f in slurmd slurmctld; do
        if alive "$STATE/$f.pid"; then as_root kill "$(cat "$STATE/$f.pid")"; fi
    done
    for _ in $(seq 100); do
        alive "$STATE/slurmd.pid" || alive "$STATE/slurmctld.pid" || return 0
        sleep 0.1
    done
    die "slurmctld/slurmd did not stop; pids in $STATE/*.pid"
}

down() {
    stop_daemons
    if alive "$STATE/munge/munged.pid"; then as_root kill "$(cat "$STATE/munge/munged.pid")"; fi
    say "down"
}

status() {
    local rc=0 f
    for f in munge/munged slurmctld slurmd; do
        if alive "$STATE/$f.pid"; then echo "${f#*/}: running (pid $(cat "$STATE/$f.pid"))"; else echo "${f#*/}: not running"; rc=1; fi
    done
    if command -v sinfo >/dev/null && sinfo >/dev/null 2>&1; then sinfo; else echo "sinfo: controller not reachable"; rc=1; fi
    return $rc
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
