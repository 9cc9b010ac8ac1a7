#!/usr/bin/env bash
# A throwaway single-node SLURM cluster on this machine: munged, slurmctld and slurmd on localhost, with every
# file they use (slurm.conf, munge key and socket, state, spool, logs, pid files) under one directory, so it
# neither reads nor changes /etc/slurm or /etc/munge and can run beside another copy of itself.
# `make slurm-up` / `make slurm-down` and the test suite's fixture (tests/slurm/conftest.py) both use it.
#
#   launchers/slurm_local.sh install        as root: apt-get install slurm-wlm munge, unless already there
#   launchers/slurm_local.sh check          exit 0 when it can run here, else the reason on stderr and exit 3
#   launchers/slurm_local.sh up [DIR]       start it; the last line on stdout is `export SLURM_CONF=DIR/etc/slurm.conf`
#   launchers/slurm_local.sh down [DIR]     cancel its jobs, stop the three daemons (DIR stays, logs included)
#   launchers/slurm_local.sh status [DIR]   sinfo + squeue
#
# DIR defaults to $SLURM_LOCAL_DIR or /tmp/mmprune-slurm. It needs root (slurmd starts every job as the user who
# submitted it) and the Debian packages `slurm-wlm munge`. No cgroups: processes are tracked through /proc
# (proctrack/linuxproc), which is what works inside containers; resources are counted, not enforced.
set -euo pipefail
# Debian installs the daemons in /usr/sbin, which a non-login shell's PATH may lack.
PATH=$PATH:/usr/sbin:/sbin

NODE=localnode
DEFAULT_DIR=${SLURM_LOCAL_DIR:-/tmp/mmprune-slurm}

say() { echo "slurm_local: $*" >&2; }

BINARIES=(munged slurmctld slurmd sbatch squeue sinfo scontrol scancel)

missing_binaries() {
    local bin
    for bin in "${BINARIES[@]}"; do
        command -v "$bin" >/dev/null 2>&1 || echo "$bin"
    done
}

install_packages() {
    [[ -z $(missing_binaries) ]] && return 0
    if [[ $(id -u) != 0 ]]; then
        say "missing $(missing_binaries | tr '\n' ' '): as root, \`apt-get install -y slurm-wlm munge\`"
        return 3
    fi
    say "installing the Debian packages slurm-wlm and munge"
    # stdout stays for the `export` line of `up`; apt's chatter goes to stderr
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge; } >&2
}

check() {
    local missing
    mapfile -t missing < <(missing_binaries)
    if ((${#missing[@]})); then
        say "missing ${missing[*]}: install them with \`apt-get install -y slurm-wlm munge\` (as root)"
        return 3
    fi
    if [[ $(id -u) != 0 ]]; then
        say "needs root: slurmd starts each job as the user who submitted it"
        return 3
    fi
}

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# First port >= $1 that nothing listens on (bash's /dev/tcp connect fails when the port is free), skipping $2.
free_port() {
    local port=$1
    while [[ $port == "${2:-}" ]] || (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        port=$((port + 1))
    done
    echo "$port"
}

write_conf() {
    local dir=$1 ctld_port=$2 slurmd_port=$3 hw cpus mem
    # The node line from what slurmd itself detects, so slurmctld never drains the node for "low memory/CPUs".
    hw=$(slurmd -C | head -1)
    cpus=$(sed -E 's/.* CPUs=([0-9]+).*/\1/' <<<"$hw")
    mem=$(sed -E 's/.* RealMemory=([0-9]+).*/\1/' <<<"$hw")
    cat >"$dir/etc/slurm.conf" <<EOF
# Written by launchers/slurm_local.sh: a one-node cluster on localhost, everything under $dir.
ClusterName=mmprune-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# our own munged, not the system one
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# no cgroups (containers rarely delegate them): track job processes through /proc, no CPU binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: plain \`sacct\` says accounting is disabled; finished jobs stay in squeue/scontrol for MinJobAge
# seconds, and \`sacct -c\` reads the job completion log below.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
MinJobAge=3600
MpiDefault=none
ReturnToService=2
# CPUs and memory are consumable, so jobs that ask for less than the node run side by side; a job that asks
# for no memory gets its CPUs' share.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$((mem / cpus))
SchedulerType=sched/backfill
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$NODE NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

logs() {
    local dir=$1
    for f in munged.log slurmctld.log slurmd.log; do
        [[ -f $dir/log/$f ]] && { echo "--- $dir/log/$f (last lines)"; tail -n 20 "$dir/log/$f"; }
    done >&2
}

up() {
    local dir=$1 ctld_port slurmd_port state
    check
    export SLURM_CONF=$dir/etc/slurm.conf
    if alive "$dir/run/slurmctld.pid" && alive "$dir/run/slurmd.pid" && alive "$dir/run/munged.pid"; then
        say "already up in $dir"
        echo "export SLURM_CONF=$SLURM_CONF"
        return 0
    fi
    down "$dir" 2>/dev/null || true  # a half-started or crashed one
    # only what an earlier `up` made: DIR itself may be a folder the caller made (pytest's tmp_path)
    rm -rf "${dir:?}"/{etc,munge,state,spool,run,log}
    mkdir -p "$dir"/{etc,munge,state,spool,run,log}
    # munged wants a socket directory that others cannot write to and a key only its owner reads;
    # clients of any user read slurm.conf
    chmod 755 "$dir" "$dir/munge" "$dir/etc"

    dd if=/dev/urandom of="$dir/etc/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/etc/munge.key"
    # --force: DIR may sit in a private folder (pytest's tmp dirs are 0700), where munged would refuse a socket
    # that users other than root cannot reach; jobs here are submitted by root, who can.
    munged --force --key-file="$dir/etc/munge.key" --socket="$dir/munge/munge.socket" --pid-file="$dir/run/munged.pid" \
        --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" \
        || { logs "$dir"; say "munged did not start"; return 1; }

    ctld_port=$(free_port "${SLURM_LOCAL_PORT:-6817}")
    slurmd_port=$(free_port $((ctld_port + 1)) "$ctld_port")
    write_conf "$dir" "$ctld_port" "$slurmd_port"
    slurmctld || { logs "$dir"; down "$dir"; say "slurmctld did not start"; return 1; }
    slurmd -N "$NODE" || { logs "$dir"; down "$dir"; say "slurmd did not start"; return 1; }

    # The node registers with slurmctld within a second or two; until then it is "unknown" or "down".
    for _ in $(seq 1 60); do
        state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
        [[ $state == idle ]] && break
        sleep 0.5
    done
    if [[ $state != idle ]]; then
        logs "$dir"
        down "$dir"
        say "node $NODE is '${state:-not answering}' after 30 s, not idle"
        return 1
    fi
    say "up: partition debug, node $NODE ($(sinfo -h -o '%c CPUs, %m MB'), slurmctld on 127.0.0.1:$ctld_port; logs in $dir/log)"
    echo "export SLURM_CONF=$SLURM_CONF"
}

# SIGTERM to the daemons of the pid files given, together (each takes a second or two to wind down), then wait.
stop_pids() {
    local pidfile pids=() pid
    for pidfile in "$@"; do
        alive "$pidfile" && pids+=("$(cat "$pidfile")")
    done
    ((${#pids[@]})) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 1 40); do
        sleep 0.25
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && continue 2
        done
        return 0
    done
    say "pids ${pids[*]} ignored SIGTERM for 10 s: SIGKILL"
    kill -KILL "${pids[@]}" 2>/dev/null || true
}

down() {
    local dir=$1 jobs
    export SLURM_CONF=$dir/etc/slurm.conf
    if alive "$dir/run/slurmctld.pid"; then
        # cancel jobs first: slurmstepd and the job processes would outlive slurmd otherwise
        jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)
        if [[ -n ${jobs// /} ]]; then
            # shellcheck disable=SC2086
            scancel $jobs || true
            for _ in $(seq 1 40); do
                [[ -z $(squeue -h -t running,completing -o %A 2>/dev/null) ]] && break
                sleep 0.25
            done
        fi
    fi
    stop_pids "$dir/run/slurmd.pid" "$dir/run/slurmctld.pid" "$dir/run/munged.pid"
    say "down ($dir kept: logs in $dir/log)"
}

status() {
    export SLURM_CONF=$1/etc/slurm.conf
    sinfo
    squeue --states=all
}

cmd=${1:-}
dir=$(realpath -m "${2:-$DEFAULT_DIR}")
case $cmd in
    install) install_packages ;;
    check) check ;;
    up) up "$dir" ;;
    down) down "$dir" ;;
    status) status "$dir" ;;
    *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
