#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for testing the Slurm profile (tests/test_slurm.py).
#
#   tools/local_slurm.sh start DIR   install slurm-wlm + munge with apt if missing, start munged, slurmctld and
#                                    slurmd on private ports with every state, log and pid file under DIR
#   tools/local_slurm.sh stop DIR    stop those daemons by the PIDs in DIR, remove the config it installed
#
# Needs root (apt, slurmd). The cluster's config goes to /etc/slurm/slurm.conf because Snakemake's Slurm jobstep
# plugin drops SLURM_* variables (SLURM_CONF included) before it calls srun inside a job, so srun finds the
# cluster only at the default path; an existing slurm.conf that this script did not write is never touched.
# Accounting is off (no slurmdbd): the profile polls with squeue, which needs MinJobAge >= 3 x the plugin's
# initial status delay; finished jobs stay visible to `squeue --states=all` for MinJobAge seconds.
set -euo pipefail

ACTION=${1:?usage: local_slurm.sh start|stop DIR}
DIR=$(mkdir -p "${2:?usage: local_slurm.sh start|stop DIR}" && cd "$2" && pwd)
CONF=/etc/slurm/slurm.conf
MARK="# written by realign tools/local_slurm.sh for $DIR"
CTLD_PORT=${REALIGN_SLURMCTLD_PORT:-16817}
SLURMD_PORT=${REALIGN_SLURMD_PORT:-16818}

stop_pidfile() {
    local pidfile=$1
    if [ -s "$pidfile" ]; then
        local pid
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    fi
}

if [ "$ACTION" = stop ]; then
    stop_pidfile "$DIR/slurmd.pid"
    stop_pidfile "$DIR/slurmctld.pid"
    stop_pidfile "$DIR/munged.pid"
    if [ -f "$CONF" ] && head -1 "$CONF" | grep -qF "$MARK"; then rm -f "$CONF"; fi
    exit 0
fi
[ "$ACTION" = start ] || { echo "unknown action $ACTION (start|stop)" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
if [ -f "$CONF" ] && ! head -1 "$CONF" | grep -qF "# written by realign tools/local_slurm.sh"; then
    echo "$CONF exists and was not written by this script: refusing to replace a real cluster's config" >&2
    exit 1
fi

for port in "$CTLD_PORT" "$SLURMD_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port is in use (another cluster from this script? stop it with: $0 stop ITS_DIR;" \
             "or choose ports with REALIGN_SLURMCTLD_PORT / REALIGN_SLURMD_PORT)" >&2
        exit 1
    fi
done

mkdir -p "$DIR"/{munge,state,spool,log}
trap 'echo "local Slurm failed to start; stopping what was started" >&2; "$0" stop "$DIR"' ERR
chmod 755 "$DIR" "$DIR/munge"  # munged refuses a socket directory others cannot traverse
[ -s "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null
chmod 600 "$DIR/munge/munge.key"
munged --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed" --force

CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.85)}' /proc/meminfo)
mkdir -p /etc/slurm
cat >"$CONF" <<EOF
$MARK
ClusterName=realign-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=2000
MinJobAge=600
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

slurmctld -f "$CONF"
slurmd -f "$CONF" -N localhost
for _ in $(seq 100); do
    if sinfo -h -o "%T" 2>/dev/null | grep -qx "idle"; then
        echo "local Slurm up: $CPUS CPUs, ${MEM_MB} MB, state under $DIR"
        exit 0
    fi
    sleep 0.2
done
echo "local Slurm did not come up; logs in $DIR/log:" >&2
tail -n 20 "$DIR"/log/*.log >&2 || true
"$0" stop "$DIR"
exit 1
