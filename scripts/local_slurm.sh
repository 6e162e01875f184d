#!/bin/bash
# A single-node SLURM cluster on this machine, for the SLURM tests (needs root and apt; no systemd:
# the daemons are started by hand). Idempotent.
#
#   bash scripts/local_slurm.sh start DIR   # installs if needed, writes DIR/slurm.conf, starts daemons
#   bash scripts/local_slurm.sh stop DIR
#   bash scripts/local_slurm.sh install-only DIR   # SLURM and munge installed, munged running (for
#                                                  # scripts/local_slurm_2node.sh)
# Then: export SLURM_CONF=DIR/slurm.conf; sinfo; sbatch ...
set -euo pipefail
ACTION=${1:?start|stop}
DIR=$(realpath -m "${2:?state directory}")

stop() {
    for daemon in slurmd slurmctld; do
        if [[ -f "$DIR/$daemon.pid" ]]; then kill "$(cat "$DIR/$daemon.pid")" 2>/dev/null || true; fi
        rm -f "$DIR/$daemon.pid"
    done
}

if [[ $ACTION == stop ]]; then stop; exit 0; fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge /etc/munge /var/lib/munge /var/log/munge
    [[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown -R munge:munge /run/munge /etc/munge /var/lib/munge /var/log/munge
    chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
    runuser -u munge -- munged
fi
if [[ $ACTION == install-only ]]; then exit 0; fi
mkdir -p "$DIR/spool/ctld" "$DIR/spool/d" "$DIR/log"

CPUS=$(getconf _NPROCESSORS_ONLN)  # not nproc: it honours OMP_NUM_THREADS
cat > "$DIR/slurm.conf" <<CONF
ClusterName=lrdlocal
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=60
DefMemPerCPU=1000
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=4000 State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$DIR/slurm.conf
stop
env -u OMP_NUM_THREADS slurmctld -f "$SLURM_CONF"
env -u OMP_NUM_THREADS slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then
        echo "SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 1
done
echo "local SLURM did not come up; see $DIR/log" >&2
exit 1
