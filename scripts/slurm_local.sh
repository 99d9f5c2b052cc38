#!/usr/bin/env bash
# A one-node Slurm on this machine, to try the cluster path (README: "On a Slurm cluster") and
# for tests/test_slurm.py. Needs root (Debian/Ubuntu: installs the packages with apt-get).
#
#   scripts/slurm_local.sh start    install if missing, write the config, start munged, slurmctld
#                                   and slurmd, wait until the node is idle (again: nothing to do)
#   scripts/slurm_local.sh stop     stop what start started (its own pid files only); again: nothing to do
#   scripts/slurm_local.sh status   what runs, and the node's state
#
# One node on 127.0.0.1 with this machine's cores and 85 % of its memory, partition `debug`;
# no systemd, cgroups or accounting (sacct). Exit status 3: cannot here (not root, no apt-get,
# a Slurm this script did not start). Config, state, logs and pid files live under
# $SLURM_LOCAL_DIR (/tmp/alexnet_lab_slurm); the config is also written to /etc/slurm/slurm.conf,
# where sbatch, squeue and scontrol look, but never over a slurm.conf that this script did not write.
set -euo pipefail
DIR=${SLURM_LOCAL_DIR:-/tmp/alexnet_lab_slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by alexnet_lab scripts/slurm_local.sh"
NODE=$(hostname -s)

# ours NAME PIDFILE: true if PIDFILE names a live (not zombie) process called NAME (daemons double-fork,
# a pid can be reused: the name and state in /proc are checked before any signal)
ours() {
    local pid
    pid=$(cat "$2" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] && alive "$pid"
}

# alive PID: not a zombie (a daemon's first fork lingers as one until init reaps it)
alive() { [ -e "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1)" != Z ]; }
# running NAME: whether a live process called NAME exists, whoever started it
running() { local pid; for pid in $(pgrep -x "$1"); do alive "$pid" && return 0; done; return 1; }

node_state() { sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -1; }  # idle, mix, alloc, down, ...

status() {
    local name
    for name in munged slurmctld slurmd; do
        if ours "$name" "$DIR/$name.pid"; then echo "$name: running (pid $(cat "$DIR/$name.pid"))"; else echo "$name: not started here"; fi
    done
    local state
    state=$(node_state || true)
    echo "node $NODE: ${state:-no controller answers}"
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        command -v munged >/dev/null && return
    command -v apt-get >/dev/null || { echo "slurm_local: no apt-get here: install slurmctld, slurmd, slurm-client and munge" >&2; exit 3; }
    # about 10 s: 8 packages (with recommends, 43); no systemd needed, none is started by the packages here
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null; } || { echo "slurm_local: apt-get could not install Slurm" >&2; exit 3; }
}

write_config() {
    if [ -e "$CONF" ] && ! grep -qxF "$MARK" "$CONF"; then
        echo "slurm_local: $CONF exists and is not ours (a real cluster's?): not touched" >&2
        exit 3
    fi
    local mem_mb
    mem_mb=$(awk '/^MemTotal/ {print int($2 / 1024 * 0.85)}' /proc/meminfo)
    rm -rf "$DIR/state" "$DIR/spool"  # a clean cluster each start: no jobs left from an earlier one
    mkdir -p "$DIR/state" "$DIR/spool" "$(dirname "$CONF")"
    cat > "$DIR/slurm.conf" <<EOF
$MARK
# (stop removes this file)
ClusterName=alexnetlab
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# a requeued job waits cred_expire (default 120 s), then a scheduler pass (default 30 s): about 11 s here
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=1,bf_interval=1
# submitit ignores SIGTERM: a cancelled or requeued job holds its cores for KillWait seconds (default 30)
KillWait=5
ReturnToService=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without it a job that asks for no memory gets the whole node, and jobs run one at a time
DefMemPerCPU=1024
MpiDefault=none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    cp "$DIR/slurm.conf" "$CONF"
}

start() {
    [ "$(id -u)" = 0 ] || { echo "slurm_local: needs root (packages, daemons, $CONF)" >&2; exit 3; }
    if ours slurmctld "$DIR/slurmctld.pid" && ours slurmd "$DIR/slurmd.pid"; then
        echo "slurm_local: already running"; status; return
    fi
    local other
    for other in slurmctld slurmd; do
        if ! ours "$other" "$DIR/$other.pid" && running "$other"; then
            echo "slurm_local: a $other this script did not start is running: not touched; stop it first" >&2
            exit 3
        fi
    done
    local began=$SECONDS
    install_packages
    mkdir -p "$DIR/munge"
    # munged: one already answering (a real node's, or ours) is used as it is
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        [ -f /etc/munge/munge.key ] || mungekey --create
        install -d -o munge -g munge -m 0755 /run/munge
        chown munge:munge "$DIR/munge"
        runuser -u munge -- /usr/sbin/munged --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log"
        ln -sf munge/munged.pid "$DIR/munged.pid"
    fi
    ours slurmd "$DIR/slurmd.pid" || ours slurmctld "$DIR/slurmctld.pid" || write_config
    ours slurmctld "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
    ours slurmd "$DIR/slurmd.pid" || slurmd -f "$CONF"
    local state=""
    for _ in $(seq 300); do  # 30 s at most; a tenth of a second here
        state=$(node_state || true)
        [ "$state" = idle ] && break
        [[ $state =~ ^(down|drain) ]] && scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
        sleep 0.1
    done
    [ "$state" = idle ] || { echo "slurm_local: node $NODE is '$state', not idle; logs in $DIR" >&2; exit 1; }
    echo "slurm_local: node $NODE idle, partition debug, in $((SECONDS - began)) s (logs in $DIR)"
}

# halt NAME PIDFILE: SIGTERM, then up to 10 s for it to exit, then SIGKILL; only a process start started
halt() {
    ours "$1" "$2" || return 0
    local pid
    pid=$(cat "$2")
    kill -TERM "$pid"
    for _ in $(seq 100); do ours "$1" "$2" || break; sleep 0.1; done
    ours "$1" "$2" && kill -KILL "$pid"
    rm -f "$2"
}

stop() {
    if ours slurmctld "$DIR/slurmctld.pid"; then  # the jobs' own processes (slurmstepd) end with their jobs
        squeue -h -o %A | xargs -r scancel
        for _ in $(seq 150); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1; done
    fi
    halt slurmd "$DIR/slurmd.pid"
    halt slurmctld "$DIR/slurmctld.pid"
    halt munged "$DIR/munge/munged.pid"
    rm -f "$DIR/munged.pid"
    if [ -e "$CONF" ] && grep -qxF "$MARK" "$CONF"; then rm -f "$CONF"; fi
    echo "slurm_local: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
