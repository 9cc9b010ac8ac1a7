#!/usr/bin/env bash
# A throwaway single-node SLURM cluster on this machine: munged, slurmdbd (with its own MariaDB), slurmctld and
# slurmd on localhost, with every file they use (configs, munge key and socket, database, state, spool, logs,
# pid files) under one directory, so it neither reads nor changes /etc/slurm, /etc/munge or /etc/mysql and can run
# beside another copy of itself. `make slurm-up` / `make slurm-down` and the test suite (tests/slurm/conftest.py)
# both use it.
#
#   launchers/slurm_local.sh install        as root: apt-get install the packages below, unless already there
#   launchers/slurm_local.sh check          exit 0 when it can run here, else the reason on stderr and exit 3
#   launchers/slurm_local.sh up [DIR]       start it; the last line on stdout is `export SLURM_CONF=DIR/etc/slurm.conf`
#   launchers/slurm_local.sh down [DIR]     cancel its jobs, stop the daemons (DIR stays, logs included)
#   launchers/slurm_local.sh status [DIR]   sinfo + squeue
#
# DIR defaults to $SLURM_LOCAL_DIR or /tmp/mmprune-slurm. It needs root (slurmd starts every job as the user who
# submitted it) and the Debian packages `slurm-wlm munge slurmdbd mariadb-server-core`.
set -euo pipefail
# Debian installs the daemons in /usr/sbin, which a non-login shell's PATH may lack.
PATH=$PATH:/usr/sbin:/sbin

# slurmdbd keeps the job records that `sacct` reads. Without it sacct answers "accounting storage is disabled",
# and submitit, which polls sacct, could never tell that a task died without writing its result (cancelled,
# killed, out of memory): the sweep would wait forever.
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server-core)
BINARIES=(munged mariadbd slurmdbd slurmctld slurmd sbatch squeue sinfo scontrol scancel sacct)
NODE=localnode
DEFAULT_DIR=${SLURM_LOCAL_DIR:-/tmp/mmprune-slurm}

say() { echo "slurm_local: $*" >&2; }

missing_binaries() {
    local bin
    for bin in "${BINARIES[@]}"; do
        command -v "$bin" >/dev/null 2>&1 || echo "$bin"
    done
}

install_packages() {
    [[ -z $(missing_binaries) ]] && return 0
    if [[ $(id -u) != 0 ]]; then
        say "missing $(missing_binaries | tr '\n' ' '): as root, \`apt-get install -y ${PACKAGES[*]}\`"
        return 3
    fi
    say "installing the Debian packages ${PACKAGES[*]}"
    # stdout stays for the `export` line of `up`; apt's chatter goes to stderr
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${PACKAGES[@]}"; } >&2
}

check() {
    local missing
    mapfile -t missing < <(missing_binaries)
    if ((${#missing[@]})); then
        say "missing ${missing[*]}: install them with \`apt-get install -y ${PACKAGES[*]}\` (as root)"
        return 3
    fi
    if [[ $(id -u) != 0 ]]; then
        say "needs root: slurmd starts each job as the user who submitted it"
        return 3
    fi
}

# Whether the daemon of pid file DIR/run/NAME.pid runs: its pid is alive AND is a process called NAME. A pid
# file left by a daemon that died may name a pid the system has since given to an unrelated process.
alive() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(cat "$1")
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$(basename "$1" .pid)" ]]
}

# The daemons fork into the background and write their pid file a moment later.
started() { wait_for 15 alive "$1"; }

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# First port >= $1 that nothing listens on and that is not one of the ports after it.
free_port() {
    local port=$1
    shift
    while listening "$port" || [[ " $* " == *" $port "* ]]; do
        port=$((port + 1))
    done
    echo "$port"
}

# Wait up to $1 seconds (wall clock: a client command may itself block for seconds) for the command after it
# to succeed; its exit code 2 means waiting longer is pointless.
wait_for() {
    local deadline=$((SECONDS + $1)) rc
    shift
    while true; do
        rc=0
        "$@" || rc=$?
        ((rc == 0)) && return 0
        ((rc == 2)) && return 2
        ((SECONDS < deadline)) || return 1
        sleep 0.25
    done
}

write_conf() {
    local dir=$1 ctld_port=$2 slurmd_port=$3 dbd_port=$4 hw cpus mem
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
# No cgroups (containers rarely delegate them): job processes are tracked through /proc, not bound to CPUs;
# resources are counted, not enforced.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# sacct's records, through our slurmdbd
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
# with munge, the "password" is the munge socket to sign with: ours, not /run/munge's
AccountingStoragePass=$dir/munge/munge.socket
# finished jobs also stay in squeue --states=all and scontrol show job for an hour
MinJobAge=3600
MpiDefault=none
MailProg=/bin/true
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
    # slurmdbd reads slurmdbd.conf beside slurm.conf, and refuses one that others may read (it can hold passwords)
    cat >"$dir/etc/slurmdbd.conf" <<EOF
# Written by launchers/slurm_local.sh: the accounting daemon of the one-node cluster in $dir.
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
DbdHost=$(hostname -s)
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
PidFile=$dir/run/slurmdbd.pid
LogFile=$dir/log/slurmdbd.log
# our MariaDB, through its socket (MYSQL_UNIX_PORT, set when slurmdbd starts)
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$dir/etc/slurmdbd.conf"
}

logs() {
    local dir=$1 f
    for f in munged.log mariadb.log slurmdbd.log slurmctld.log slurmd.log; do
        [[ -f $dir/log/$f ]] && { echo "--- $dir/log/$f (last lines)"; tail -n 20 "$dir/log/$f"; }
    done >&2
}

# Leave nothing half-started behind: logs to stderr, stop what runs, name what failed.
fail() {
    logs "$1"
    down "$1" 2>/dev/null || true
    say "$2"
    return 1
}

up() {
    local dir=$1 ctld_port slurmd_port dbd_port state
    check
    export SLURM_CONF=$dir/etc/slurm.conf
    if alive "$dir/run/slurmctld.pid" && alive "$dir/run/slurmd.pid" && alive "$dir/run/slurmdbd.pid"; then
        say "already up in $dir"
        echo "export SLURM_CONF=$SLURM_CONF"
        return 0
    fi
    down "$dir" 2>/dev/null || true  # a half-started or crashed one
    # only what an earlier `up` made: DIR itself may be a folder the caller made (pytest's tmp_path)
    rm -rf "${dir:?}"/{etc,munge,db,state,spool,run,log}
    mkdir -p "$dir"/{etc,munge,db,state,spool,run,log}
    # munged wants a socket directory that others cannot write to and a key only its owner reads;
    # clients of any user read slurm.conf
    chmod 755 "$dir" "$dir/munge" "$dir/etc"

    dd if=/dev/urandom of="$dir/etc/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/etc/munge.key"
    # --force: DIR may sit in a private folder (pytest's tmp dirs are 0700), where munged would refuse a socket
    # that users other than root cannot reach; jobs here are submitted by root, who can.
    munged --force --key-file="$dir/etc/munge.key" --socket="$dir/munge/munge.socket" --pid-file="$dir/run/munged.pid" \
        --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" && started "$dir/run/munged.pid" \
        || fail "$dir" "munged did not start"

    # A throwaway database: socket only, no grant tables (only root can reach the socket), small buffers.
    # mariadbd stays in the foreground, so it goes to the background here with its output in a file: a caller
    # that reads this script's output through a pipe would otherwise wait for the database to exit.
    setsid mariadbd --no-defaults --user=root --datadir="$dir/db" --socket="$dir/run/mysqld.sock" --skip-networking \
        --skip-grant-tables --pid-file="$dir/run/mariadbd.pid" --log-error="$dir/log/mariadb.log" \
        --innodb-buffer-pool-size=16M --innodb-log-file-size=8M </dev/null >>"$dir/log/mariadb.log" 2>&1 &
    wait_for 30 test -S "$dir/run/mysqld.sock" || fail "$dir" "mariadbd did not start"

    ctld_port=$(free_port "${SLURM_LOCAL_PORT:-6817}")
    slurmd_port=$(free_port $((ctld_port + 1)) "$ctld_port")
    dbd_port=$(free_port $((slurmd_port + 1)) "$ctld_port" "$slurmd_port")
    write_conf "$dir" "$ctld_port" "$slurmd_port" "$dbd_port"
    MYSQL_UNIX_PORT=$dir/run/mysqld.sock slurmdbd && started "$dir/run/slurmdbd.pid" \
        || fail "$dir" "slurmdbd did not start"
    # slurmdbd creates its tables before it listens; a slurmctld started before that runs without accounting
    wait_for 60 listening "$dbd_port" || fail "$dir" "slurmdbd is not listening on port $dbd_port"
    slurmctld && started "$dir/run/slurmctld.pid" || fail "$dir" "slurmctld did not start"
    slurmd -N "$NODE" && started "$dir/run/slurmd.pid" || fail "$dir" "slurmd did not start"

    # The node registers with slurmctld within a second or two; until then it is "unknown" or "down". A daemon
    # that exits on a config or database error ends the wait at once.
    node_idle() {
        alive "$dir/run/slurmctld.pid" && alive "$dir/run/slurmd.pid" || return 2
        state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
        [[ $state == idle ]]
    }
    wait_for 30 node_idle || {
        alive "$dir/run/slurmctld.pid" || fail "$dir" "slurmctld exited"
        alive "$dir/run/slurmd.pid" || fail "$dir" "slurmd exited"
        fail "$dir" "node $NODE is '${state:-not answering}' after 30 s, not idle"
    }
    # slurmctld adds its cluster to the database when it first registers; sacct answers for it from then on
    wait_for 30 sacctmgr -n show cluster mmprune-local format=cluster%30 >/dev/null 2>&1 \
        || fail "$dir" "the cluster is not registered with slurmdbd"
    say "up: partition debug, node $NODE ($(sinfo -h -o '%c CPUs, %m MB'), slurmctld on 127.0.0.1:$ctld_port;" \
        "logs in $dir/log)"
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
    stop_pids "$dir/run/slurmd.pid" "$dir/run/slurmctld.pid"
    # each after those that talk to it on the way out: slurmctld hands its last records to slurmdbd, which
    # commits them to the database
    stop_pids "$dir/run/slurmdbd.pid"
    stop_pids "$dir/run/mariadbd.pid" "$dir/run/munged.pid"
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
