#!/bin/bash
# A two-node SLURM cluster on this machine, for the multi-node tests (needs root and SLURM/munge,
# which scripts/local_slurm.sh installs): two network namespaces joined by a veth pair, each a host
# of its own (its own host name and address, the filesystem shared as a cluster's home is), with
# slurmctld and slurmd on n1 and a slurmd on n2. Nothing it creates outlives `stop`.
#
#   bash scripts/local_slurm_2node.sh start DIR   # writes DIR/slurm.conf, starts the daemons
#   bash scripts/local_slurm_2node.sh run DIR -- sinfo   # any command, inside n1's network
#   bash scripts/local_slurm_2node.sh stop DIR    # daemons, namespaces, veth, state files
#
# Addresses 10.77.77.1 (n1) and 10.77.77.2 (n2) exist only inside the namespaces; no traffic leaves
# them. SlurmdTimeout is short (10 s) so that a lost node is noticed at once.
set -euo pipefail
ACTION=${1:?start|run|stop}
DIR=$(realpath -m "${2:?state directory}")
PREFIX=${LRD_NETNS_PREFIX:-lrdn}
N1=${PREFIX}1 N2=${PREFIX}2
ADDR1=10.77.77.1 ADDR2=10.77.77.2

in_net() {  # namespace, then a command: run it with that network only (not `ip netns exec`: it remounts /sys)
    local ns=$1
    shift
    nsenter --net="/var/run/netns/$ns" "$@"
}

stop() {
    for pidfile in "$DIR"/slurmctld.pid "$DIR"/slurmd.*.pid; do
        [[ -f "$pidfile" ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    sleep 1
    for pidfile in "$DIR"/slurmctld.pid "$DIR"/slurmd.*.pid; do
        [[ -f "$pidfile" ]] && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    done
    ip netns del "$N1" 2>/dev/null || true
    ip netns del "$N2" 2>/dev/null || true
    ip link del "${PREFIX}v1" 2>/dev/null || true  # a start cut short before the pair moved
}

case $ACTION in
stop)
    stop
    rm -rf "$DIR"
    exit 0
    ;;
run)
    shift 2
    [[ ${1:-} == -- ]] && shift
    export SLURM_CONF=$DIR/slurm.conf
    exec nsenter --net="/var/run/netns/$N1" "$@"
    ;;
esac

bash "$(dirname "$0")/local_slurm.sh" install-only "$DIR" >/dev/null
stop
mkdir -p "$DIR/log" "$DIR/spool"
ip netns add "$N1"
ip netns add "$N2"
ip link add "${PREFIX}v1" type veth peer name "${PREFIX}v2"
ip link set "${PREFIX}v1" netns "$N1"
ip link set "${PREFIX}v2" netns "$N2"
ip -n "$N1" link set "${PREFIX}v1" name lrd0
ip -n "$N2" link set "${PREFIX}v2" name lrd0
ip -n "$N1" addr add "$ADDR1/24" dev lrd0
ip -n "$N2" addr add "$ADDR2/24" dev lrd0
for ns in "$N1" "$N2"; do
    ip -n "$ns" link set lo up
    ip -n "$ns" link set lrd0 up
done

cat > "$DIR/slurm.conf" <<CONF
ClusterName=lrdtwo
SlurmctldHost=n1($ADDR1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
SlurmdTimeout=10
DefMemPerCPU=1000
NodeName=n1 NodeAddr=$ADDR1 CPUs=1 RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeAddr=$ADDR2 CPUs=1 RealMemory=4000 State=UNKNOWN
PartitionName=two Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
mkdir -p "$DIR/spool/ctld" "$DIR/spool/n1" "$DIR/spool/n2"
export SLURM_CONF=$DIR/slurm.conf
in_net "$N1" unshare --uts sh -c "hostname n1; env -u OMP_NUM_THREADS slurmctld -f '$SLURM_CONF'"
in_net "$N1" unshare --uts sh -c "hostname n1; env -u OMP_NUM_THREADS slurmd -N n1 -f '$SLURM_CONF'"
in_net "$N2" unshare --uts sh -c "hostname n2; env -u OMP_NUM_THREADS slurmd -N n2 -f '$SLURM_CONF'"
for _ in $(seq 60); do
    if [[ $(in_net "$N1" sinfo -h -o %T 2>/dev/null | grep -Ec '^(idle|mixed|allocated)') -ge 1 ]] &&
        [[ $(in_net "$N1" sinfo -h -N -o '%N %T' 2>/dev/null | grep -Ec ' (idle|mixed|allocated)') -eq 2 ]]; then
        echo "SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 1
done
echo "the two-node SLURM did not come up; see $DIR/log" >&2
exit 1
