#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests, CI and laptops.
#
#   slurm/local-cluster.sh up       # install if missing, start munged/slurmctld/slurmd, wait for idle
#   eval "$(slurm/local-cluster.sh up | tail -n 1)"   # ... and export SLURM_CONF in this shell
#   slurm/local-cluster.sh status   # sinfo + squeue; exit 1 when the cluster is not running
#   slurm/local-cluster.sh down     # stop the daemons this script started (by their pid files)
#
# Needs root (the daemons run as root; SlurmUser=root) and no systemd: the daemons are started by
# hand. Packages (Debian: slurmctld slurmd slurm-client munge) are installed with apt when missing.
#
# Environment:
#   HPCSOUP_SLURM_DIR      state dir: slurm.conf, state, spool, logs, pid files
#                          (default /tmp/hpcsoup-slurm)
#   HPCSOUP_SLURM_TIMEOUT  seconds `up` waits for the node to become idle (default 60)
#   HPCSOUP_SLURM_PORT     slurmctld port; slurmd uses the next one (default 6817)
#
# The node has CPUs=$(nproc) and one default partition `debug` with OverSubscribe=FORCE:4, so up to
# 4 jobs share a core: an `sbatch --array=0-7` of 1-CPU tasks runs all at once on 2 cores. A single
# job asking for more tasks than cores (`srun -n 4` on 2 cores) must add `--overcommit` (`-O`),
# otherwise SLURM waits forever ("Requested partition configuration not available").
# MpiDefault=pmi2: `srun -n 2 python -c 'from mpi4py import MPI ...'` gives one world of size 2
# with the pip `mpich` wheel (pmix does not work with it).
# AuthInfo=cred_expire=10: a requeued job (pre-emption, `scontrol requeue`) may run again after
# 10 s instead of SLURM's default 120 s, so that tests can requeue for real.
#
# `up` prints `export SLURM_CONF=<dir>/slurm.conf` as its last line of stdout; everything else goes
# to stderr.
set -euo pipefail

DIR="${HPCSOUP_SLURM_DIR:-/tmp/hpcsoup-slurm}"
TIMEOUT="${HPCSOUP_SLURM_TIMEOUT:-60}"
PORT="${HPCSOUP_SLURM_PORT:-6817}"
CONF="$DIR/slurm.conf"
RUN="$DIR/run"
LOG="$DIR/log"

say() { echo "local-cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

alive() {  # alive PIDFILE: the pid in PIDFILE is a running process
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

log_tails() {
    local f
    for f in "$LOG/slurmctld.log" "$LOG/slurmd.log"; do
        [[ -f "$f" ]] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

install_packages() {
    local missing=0 cmd
    for cmd in slurmctld slurmd sinfo sbatch munged munge unmunge; do
        command -v "$cmd" >/dev/null 2>&1 || missing=1
    done
    [[ $missing == 0 ]] && return 0
    [[ $(id -u) == 0 ]] || die "SLURM is not installed and installing it needs root"
    command -v apt-get >/dev/null 2>&1 || die "SLURM is not installed and apt-get is not available"
    say "installing slurmctld slurmd slurm-client munge with apt"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >&2
}

write_conf() {
    local host cpus mem_kb mem_mb
    host="$(hostname -s)"
    cpus="$(nproc)"
    mem_kb="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
    mem_mb=$(( mem_kb / 1024 - 2048 ))
    (( mem_mb > 512 )) || mem_mb=512
    mkdir -p "$DIR/state" "$DIR/spool" "$RUN" "$LOG"
    cat > "$CONF.tmp" <<EOF
# Written by slurm/local-cluster.sh: a single-node cluster for tests. Edit the script, not this file.
ClusterName=hpcsoup
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds before it runs again (default 120): tests requeue.
AuthInfo=cred_expire=10
SlurmctldPort=$PORT
SlurmdPort=$(( PORT + 1 ))
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=pmi2
ReturnToService=2
SchedulerType=sched/backfill
# A job that becomes eligible without an event (a requeued one, cred_expire after its requeue)
# waits for the main scheduler's periodic pass, by default every 60 s (measured: a task requeued
# twice restarted 35 and 46 s after each requeue); a pass every second restarts it ~11 s after.
SchedulerParameters=sched_interval=1
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    mv "$CONF.tmp" "$CONF"
}

munge_ok() {
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1
}

start_munge() {
    if munge_ok; then
        return 0
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 600 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- munged
    local i
    for i in $(seq 1 50); do
        munge_ok && break
        sleep 0.1
    done
    munge_ok || die "munged did not start (see /var/log/munge/munged.log)"
    # Remember that we started it, so that `down` stops it (and only then).
    cp /run/munge/munged.pid "$RUN/munged.pid"
}

node_state() {
    SLURM_CONF="$CONF" sinfo -h -N -o '%T' 2>/dev/null | head -n 1 | tr -d '*~#!%$@^-' || true
}

wait_idle() {
    local deadline state
    deadline=$(( $(date +%s) + TIMEOUT ))
    while :; do
        state="$(node_state)"
        # Check our own daemons too: with a port clash, sinfo may answer from another cluster.
        if ! alive "$RUN/slurmctld.pid" || ! alive "$RUN/slurmd.pid"; then
            state="daemons not running"
        fi
        case "$state" in
            idle|mixed|allocated|completing) return 0 ;;
            down|drained|draining|fail|failing)
                # ReturnToService=2 normally does this; a restarted slurmctld may remember "down".
                SLURM_CONF="$CONF" scontrol update nodename="$(hostname -s)" state=resume \
                    >/dev/null 2>&1 || true ;;
        esac
        if (( $(date +%s) >= deadline )); then
            say "error: the node is not idle after ${TIMEOUT}s (state: '${state:-no answer}')"
            log_tails
            if { tail -n 25 "$LOG/slurmctld.log"; tail -n 25 "$LOG/slurmd.log"; } 2>/dev/null \
                    | grep "Address already in use" >/dev/null; then
                say "hint: another slurmctld/slurmd holds port $PORT or $(( PORT + 1 )); stop it or" \
                    "set HPCSOUP_SLURM_PORT"
            fi
            exit 1
        fi
        sleep 0.5
    done
}

cmd_up() {
    install_packages
    [[ $(id -u) == 0 ]] || die "the local cluster runs its daemons as root; run as root"
    mkdir -p "$DIR"
    if alive "$RUN/slurmctld.pid" && alive "$RUN/slurmd.pid" && [[ -f "$CONF" ]]; then
        say "already running (state dir $DIR)"
    else
        cmd_down_quiet
        write_conf
        start_munge
        slurmctld -f "$CONF" || { log_tails; die "slurmctld failed to start"; }
        slurmd -f "$CONF" || { log_tails; die "slurmd failed to start"; }
    fi
    wait_idle
    say "up: $(SLURM_CONF="$CONF" sinfo -h -o '%P %D %T %c CPUs' | head -n 1)"
    echo "export SLURM_CONF=$CONF"
}

stop_pid() {  # stop_pid PIDFILE NAME
    local pidfile="$1" name="$2" pid i
    alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid="$(cat "$pidfile")"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name (pid $pid) did not stop in 10 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    say "stopped $name (pid $pid)"
}

cmd_down_quiet() {
    stop_pid "$RUN/slurmd.pid" slurmd
    stop_pid "$RUN/slurmctld.pid" slurmctld
    stop_pid "$RUN/munged.pid" munged
}

cmd_down() {
    if [[ ! -d "$RUN" ]]; then
        say "not running (no state dir $DIR)"
        return 0
    fi
    cmd_down_quiet
}

cmd_status() {
    if ! alive "$RUN/slurmctld.pid" || ! alive "$RUN/slurmd.pid"; then
        say "not running (state dir $DIR)"
        return 1
    fi
    SLURM_CONF="$CONF" sinfo
    SLURM_CONF="$CONF" squeue
    echo "export SLURM_CONF=$CONF"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status   (state dir: \$HPCSOUP_SLURM_DIR, default /tmp/hpcsoup-slurm)" >&2
       exit 2 ;;
esac
