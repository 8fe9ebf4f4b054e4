#!/bin/bash
# A one-node SLURM cluster on this machine, to try every sbatch script in slurm/ on a laptop (and for CI).
#
#   sudo bash slurm/local_cluster.sh start     # installs slurm-wlm + munge with apt if absent, starts the daemons
#   export SLURM_CONF=/tmp/diffusion-lab-slurm/slurm.conf                 # start prints this line; sbatch needs it
#   sbatch -c 1 --mem=2G slurm/run_diffusion_mnist1d.sh --epochs 1    # shrink the scripts' CPU/memory requests
#   bash slurm/local_cluster.sh status        # one line: the node's state, or "not running"
#   bash slurm/local_cluster.sh stop          # cancels this cluster's jobs, ends the daemons it started
#
# Everything it writes (config, munge key, state, logs, pid files) lives in LOCAL_SLURM_DIR
# (default /tmp/diffusion-lab-slurm); nothing outside it is touched except what apt installs. The node
# has this machine's CPUs and free memory, two partitions over it ("local", the default, and "short",
# which run_diffusion_mnist1d.sh asks for), and no GPUs: the GPU scripts run there on the CPU when
# given --gres=gpu:0. Ports: LOCAL_SLURM_PORT (default 6817) for slurmctld, the next one for slurmd.
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/diffusion-lab-slurm}
PORT=${LOCAL_SLURM_PORT:-6817}
export SLURM_CONF="$DIR/slurm.conf"
DAEMONS=(slurmd slurmctld munged)   # stopped in this order, started in the reverse

alive() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

node_line() {   # "node vm idle, 2 CPUs, 20711 MB; partitions local*,short" (* marks the default)
    local node partitions
    node=$(sinfo -h -N -p local -o 'node %N %T, %c CPUs, %m MB' 2>/dev/null) || return 0
    partitions=$(sinfo -h -o %P 2>/dev/null | paste -sd , -)
    [ -n "$node" ] && echo "$node; partitions $partitions"
}

status() {
    if alive slurmctld && alive slurmd && [ -n "$(node_line)" ]; then
        echo "local SLURM running: $(node_line) (export SLURM_CONF=$SLURM_CONF)"
    else
        echo "local SLURM not running"
        return 1
    fi
}

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
    [ "$(id -u)" -eq 0 ] || { echo "error: slurm-wlm and munge are not installed; run this as root to install them with apt" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge >"$DIR/apt.log" 2>&1 ||
        { apt-get update -q >>"$DIR/apt.log" 2>&1 && apt-get install -y -q slurm-wlm munge >>"$DIR/apt.log" 2>&1; } ||
        { echo "error: apt-get install slurm-wlm munge failed (log: $DIR/apt.log)" >&2; exit 1; }
}

write_config() {
    local host cpus memory_mb
    host=$(hostname -s)
    cpus=$(nproc)
    memory_mb=$(awk '/MemAvailable/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)  # 90% of what is free now
    cat >"$SLURM_CONF" <<EOF
# Written by slurm/local_cluster.sh: one node, this machine, daemons and jobs as $(id -un).
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again 10 s after its requeue (the default 120 s is for big clusters)
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MailProg=/bin/true
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=$((memory_mb / cpus))
PartitionName=short Nodes=ALL MaxTime=INFINITE State=UP DefMemPerCPU=$((memory_mb / cpus))
EOF
}

start() {
    if status >/dev/null 2>&1; then status; return 0; fi
    mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool"
    chmod 700 "$DIR/munge"
    install
    write_config
    [ -f "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key"
    chmod 600 "$DIR/munge/munge.key"
    alive munged || munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munge/munge.seed"
    alive slurmctld || slurmctld -f "$SLURM_CONF"
    alive slurmd || slurmd -f "$SLURM_CONF"
    for _ in $(seq 60); do   # up to 30 s for the node to register
        if sinfo -h -N -o '%T' 2>/dev/null | grep -qx idle; then status; return 0; fi
        sleep 0.5
    done
    echo "error: the node did not come up idle in 30 s; logs in $DIR:" >&2
    tail -n 5 "$DIR"/slurmctld.log "$DIR"/slurmd.log "$DIR"/munged.log >&2 || true
    exit 1
}

stop() {
    if alive slurmctld; then   # this cluster's jobs first, so that no job step outlives its daemons
        scancel --full --quiet $(squeue -h -o %A 2>/dev/null) 2>/dev/null || true
        for _ in $(seq 20); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
    fi
    local name pid stopped=()
    for name in "${DAEMONS[@]}"; do
        alive "$name" || continue
        pid=$(cat "$DIR/$name.pid")
        kill "$pid"
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        rm -f "$DIR/$name.pid"
        stopped+=("$name")
    done
    echo "local SLURM stopped${stopped:+: ${stopped[*]}}"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
