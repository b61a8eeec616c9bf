#!/usr/bin/env bash
# One srun task per node (started by slurm/dsmoe_job.sh): this node's DeepSpeed launcher, without ssh.
#
#   deepspeed --hostfile H --no_ssh --node_rank $SLURM_NODEID --master_addr A --master_port P \
#       launch/train.py --config $CONFIG $OVERRIDES
#
# Stopping: when the batch shell creates $DSMOE_STOP_FILE (or this task gets SIGTERM), SIGTERM goes to this
# node's training processes only (train.py then saves a checkpoint and exits 0).  The deepspeed launcher itself
# is started with SIGTERM ignored, because on SIGTERM it would exit at once and DeepSpeed's per-node launch.py
# would kill the ranks after 30 s; this task stays alive until the ranks have finished saving.
set -uo pipefail

say() { echo "[dsmoe-slurm node ${SLURM_NODEID:-?} $(hostname) $(date +%H:%M:%S)] $*"; }

cd "${DSMOE_REPO:?}" || exit 2
NODE_RANK=${SLURM_NODEID:?"SLURM_NODEID unset: run under srun"}
POLL_S=${DSMOE_POLL_S:-2}
read -r -a OVERRIDE_ARGS <<< "${OVERRIDES:-}"

cmd=("$DSMOE_DEEPSPEED" --hostfile "$DSMOE_HOSTFILE" --no_ssh --node_rank "$NODE_RANK"
     --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     launch/train.py --config "$CONFIG" "${OVERRIDE_ARGS[@]}")
say "${cmd[*]}"

stop=0
trap 'stop=1' TERM INT USR1
( trap '' TERM INT; exec "${cmd[@]}" ) &
ds_pid=$!

# the ranks: children of DeepSpeed's launch.py, which is the child of the deepspeed runner
ranks() {
    local lp
    for lp in $(ps -o pid= --ppid "$ds_pid" 2>/dev/null); do ps -o pid= --ppid "$lp" 2>/dev/null; done
}

told=0
while kill -0 "$ds_pid" 2>/dev/null; do
    if (( stop )) || [[ -e ${DSMOE_STOP_FILE:-/nonexistent} ]]; then
        pids=$(echo $(ranks))                     # one line, single spaces
        if [[ -n $pids ]]; then
            (( told )) || say "stop requested: SIGTERM to the training processes ($pids); waiting for their checkpoint"
            # repeated on every poll: a rank still starting up ignores SIGTERM until its trainer loop is running
            kill -TERM $pids 2>/dev/null
            told=1
        fi
    fi
    sleep "$POLL_S" & wait $! 2>/dev/null
done
wait "$ds_pid"; rc=$?
# a signal that interrupted the wait above leaves the status unknown (> 128): ask once more
while (( rc > 128 )) && kill -0 "$ds_pid" 2>/dev/null; do wait "$ds_pid"; rc=$?; done
say "deepspeed exited with status $rc"
exit "$rc"
