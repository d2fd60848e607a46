#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests and for trying the sbatch recipes without a real cluster:
# slurmctld, slurmd (node "localhost", 127.0.0.1) and a private munged, configured, logging and keeping state under
# one folder. Needs root (the daemons and the jobs run as root) and the Debian 12 packages of `make slurm-env`
# (Slurm 22.05). There is no systemd here: the daemons are started by hand and stopped by the pids they recorded.
#
#   tools/slurm_cluster.sh start [DIR]    write DIR/slurm.conf, start the daemons, wait until the node is idle
#   tools/slurm_cluster.sh stop [DIR]     cancel the jobs, stop the daemons started from DIR; logs stay in DIR/log
#   tools/slurm_cluster.sh status [DIR]   the controller's and the node's state; exit 1 when the cluster is not up
#   export SLURM_CONF=DIR/slurm.conf      then sbatch, srun, squeue, scancel and scontrol use this cluster
#
# Arguments:
#   DIR                    the cluster's folder, default $SAPO_SLURM_DIR, else /tmp/sapo-slurm. munged wants every
#                          folder above its socket searchable by all (mode o+x), so keep it out of private folders.
# Environment (read by start; all optional):
#   SAPO_SLURM_CTLD_PORT   slurmctld's port (default 6817); two clusters on one machine need different ports
#   SAPO_SLURM_NODE_PORT   slurmd's port (default 6818)
#   SAPO_SLURM_CPUS        CPUs the node offers (default: the online CPUs)
#   SAPO_SLURM_MEMORY_MB   memory the node offers, MB (default: MemTotal)
#   SAPO_SLURM_TIMEOUT     seconds to wait for the node to become idle at start (default 30)
#
# Fixed choices: auth/munge with the cluster's own key and socket, proctrack/linuxproc and task/none (no cgroups),
# select/cons_tres with CR_Core, no accounting database (no sacct; finished jobs stay in `scontrol show job` for
# MinJobAge = 600 s, and their final states are appended to DIR/jobcomp.txt), one partition "debug". Tuned for
# tests: a requeued job may start again after 5 s (cred_expire; Slurm's default is 120 s), the scheduler runs every
# 2 s, and scancel leaves jobs 60 s between SIGTERM and SIGKILL (KillWait; 30 s by default) for a slow machine.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop|status [DIR]" >&2
    exit 2
}

[[ $# -ge 1 && $# -le 2 ]] || usage
action=$1
dir=${2:-${SAPO_SLURM_DIR:-/tmp/sapo-slurm}}
ctld_port=${SAPO_SLURM_CTLD_PORT:-6817}
node_port=${SAPO_SLURM_NODE_PORT:-6818}
cpus=${SAPO_SLURM_CPUS:-$(getconf _NPROCESSORS_ONLN)}  # not nproc: it obeys OMP_NUM_THREADS
memory_mb=${SAPO_SLURM_MEMORY_MB:-$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)}
timeout=${SAPO_SLURM_TIMEOUT:-30}
export SLURM_CONF=$dir/slurm.conf

daemons=(slurmctld slurmd munged)

write_config() {
    cat >"$SLURM_CONF" <<EOF
ClusterName=sapo
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$node_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.sock,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
MinJobAge=600
KillWait=60
UnkillableStepTimeout=120
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

alive() {  # alive PID: the process runs (a zombie, ended but not yet collected by its parent, does not)
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

running() {  # running DAEMON: its recorded pid is alive and is that daemon
    local pid
    pid=$(cat "$dir/$1.pid" 2>/dev/null) || return 1
    alive "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1"* ]]
}

node_state() {
    sinfo --noheader --nodes=localhost --format=%T 2>/dev/null
}

start() {
    for daemon in "${daemons[@]}"; do
        if running "$daemon"; then
            echo "$daemon from $dir is already running; stop it first: $0 stop $dir" >&2
            exit 1
        fi
    done
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        echo "Slurm or munge is not installed: run make slurm-env" >&2
        exit 1
    fi
    if ((EUID != 0)); then
        echo "the local cluster runs its daemons and jobs as root: run this as root" >&2
        exit 1
    fi
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    chmod 711 "$dir"
    [[ -f $dir/munge.key ]] || mungekey --create --keyfile="$dir/munge.key"
    write_config
    munged --socket="$dir/munge.sock" --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" \
        --log-file="$dir/log/munged.log" --seed-file="$dir/munged.seed"
    slurmctld -i  # -i: ignore state left by an earlier cluster in this folder
    slurmd -N localhost
    local waited=0
    until [[ $(node_state) == idle ]]; do
        if ((waited >= timeout)); then
            echo "the node is not idle after ${timeout}s (state: '$(node_state)'); logs in $dir/log;" \
                "stop the daemons with: $0 stop $dir" >&2
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    echo "Slurm is up: export SLURM_CONF=$SLURM_CONF"
}

cancel_jobs() {  # so that no job outlives the cluster: SIGTERM now, SIGKILL after KillWait (60 s)
    local jobs
    mapfile -t jobs < <(squeue --noheader --format=%i 2>/dev/null)
    ((${#jobs[@]})) || return 0
    scancel "${jobs[@]}"
    for _ in $(seq 75); do
        [[ -z $(squeue --noheader --format=%i 2>/dev/null) ]] && return 0
        sleep 1
    done
    echo "jobs ${jobs[*]} still listed after 75 s" >&2
}

stop() {
    local daemon pids=()
    if running slurmctld && running slurmd; then
        cancel_jobs
    fi
    for daemon in "${daemons[@]}"; do
        if running "$daemon"; then
            pids+=("$(cat "$dir/$daemon.pid")")
        fi
    done
    ((${#pids[@]})) || return 0
    kill "${pids[@]}"
    local pid left
    for _ in $(seq 100); do
        left=0
        for pid in "${pids[@]}"; do
            alive "$pid" && left=1
        done
        ((left)) || return 0
        sleep 0.1
    done
    echo "daemons still running after 10 s; killing them" >&2
    kill -9 "${pids[@]}" 2>/dev/null || true
}

status() {
    local daemon up=0
    for daemon in "${daemons[@]}"; do
        if running "$daemon"; then
            echo "$daemon: running (pid $(cat "$dir/$daemon.pid"))"
        else
            echo "$daemon: not running"
            up=1
        fi
    done
    ((up == 0)) && echo "node localhost: $(node_state)"
    return "$up"
}

case $action in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac
