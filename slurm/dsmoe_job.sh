#!/usr/bin/env bash
# Body of slurm/train_1node.sbatch and slurm/train_multinode.sbatch (they exec it, so this shell *is* the batch
# shell and gets the `--signal=B:TERM@120` warning).  See slurm/README.md.
#
#   1. writes a job-specific hostfile (one "hostname slots=GPUS_PER_NODE" line per node),
#   2. runs slurm/node_task.sh once per node with srun (no ssh: each node starts its own
#      `deepspeed --hostfile H --no_ssh --node_rank $SLURM_NODEID ... launch/train.py`),
#   3. on SIGTERM/SIGUSR1 asks every node's training processes to checkpoint and stop (train.py exits 0),
#   4. requeues the job (scontrol requeue) when the run stopped before train.max_steps.
set -uo pipefail

say() { echo "[dsmoe-slurm $(date +%H:%M:%S)] $*"; }
die() { say "error: $*" >&2; exit 2; }

REPO=${DSMOE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO" || die "cannot cd to the repo dir $REPO (set SLURM_SUBMIT_DIR/DSMOE_REPO or submit from the repo)"
[[ -f launch/train.py ]] || die "$REPO has no launch/train.py: submit from the dsmoe repo (or set DSMOE_REPO)"

JOB_ID=${SLURM_JOB_ID:?"not inside a Slurm job (SLURM_JOB_ID unset): submit with sbatch"}
CONFIG=${CONFIG:-launch/configs/quickstart.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
OVERRIDES=${OVERRIDES:-}
[[ -f $CONFIG ]] || die "CONFIG=$CONFIG: no such file (relative paths are relative to $REPO)"

# the launcher and an interpreter (the latter only reads train.output_dir from the YAML)
if [[ -n ${DSMOE_DEEPSPEED:-} ]]; then DEEPSPEED=$DSMOE_DEEPSPEED
elif [[ -x $REPO/.venv/bin/deepspeed ]]; then DEEPSPEED=$REPO/.venv/bin/deepspeed
else DEEPSPEED=$(command -v deepspeed) || die "no deepspeed launcher: set DSMOE_DEEPSPEED or create $REPO/.venv"
fi
if [[ -n ${DSMOE_PYTHON:-} ]]; then PYTHON=$DSMOE_PYTHON
elif [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python
else PYTHON=$(command -v python3 || command -v python || true)
fi

# nodes: the first NODES hosts of the allocation; rank 0's host is the rendezvous (MASTER_ADDR)
mapfile -t HOSTS < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST unset}")
(( ${#HOSTS[@]} > 0 )) || die "scontrol show hostnames '$SLURM_JOB_NODELIST' listed no hosts"
NODES=${NODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-${#HOSTS[@]}}}}
(( NODES >= 1 && NODES <= ${#HOSTS[@]} )) || die "NODES=$NODES but the allocation has ${#HOSTS[@]} host(s): ${HOSTS[*]}"
HOSTS=("${HOSTS[@]:0:NODES}")
MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}

JOB_DIR=${DSMOE_JOB_DIR:-$REPO/logs/slurm-$JOB_ID}       # must be on a filesystem every node sees
mkdir -p "$JOB_DIR" || die "cannot create $JOB_DIR"
HOSTFILE=$JOB_DIR/hostfile
STOP_FILE=$JOB_DIR/stop
rm -f "$STOP_FILE"
: > "$HOSTFILE.tmp"
for h in "${HOSTS[@]}"; do echo "$h slots=$GPUS_PER_NODE" >> "$HOSTFILE.tmp"; done
mv -f "$HOSTFILE.tmp" "$HOSTFILE"                        # also marks the start of this job segment

# train.output_dir: the last train.output_dir= override, else the YAML's, else the TrainConfig default
OUTPUT_DIR=${OUTPUT_DIR:-}
read -r -a OVERRIDE_ARGS <<< "$OVERRIDES"
if [[ -z $OUTPUT_DIR ]]; then
    for o in "${OVERRIDE_ARGS[@]}"; do [[ $o == train.output_dir=* ]] && OUTPUT_DIR=${o#train.output_dir=}; done
fi
if [[ -z $OUTPUT_DIR && -n $PYTHON ]]; then
    OUTPUT_DIR=$("$PYTHON" -c 'import sys, yaml
t = (yaml.safe_load(open(sys.argv[1])) or {}).get("train") or {}
print(t.get("output_dir") or "runs/quickstart")' "$CONFIG" 2>/dev/null) || OUTPUT_DIR=""
fi
[[ -n $OUTPUT_DIR ]] || say "warning: could not work out train.output_dir; requeueing on any SIGTERM"

say "job $JOB_ID${SLURM_RESTART_COUNT:+ (restart $SLURM_RESTART_COUNT)} on $NODES node(s) x $GPUS_PER_NODE GPU(s): ${HOSTS[*]}"
say "repo $REPO; config $CONFIG; overrides: ${OVERRIDES:-(none)}"
say "output_dir ${OUTPUT_DIR:-?} (resumes from its newest checkpoint); master $MASTER_ADDR:$MASTER_PORT"
say "launcher $DEEPSPEED; hostfile $HOSTFILE:"
sed 's/^/    /' "$HOSTFILE"

export DSMOE_REPO=$REPO DSMOE_DEEPSPEED=$DEEPSPEED DSMOE_HOSTFILE=$HOSTFILE DSMOE_STOP_FILE=$STOP_FILE
export CONFIG OVERRIDES GPUS_PER_NODE MASTER_ADDR MASTER_PORT NODES
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
if [[ -z ${OMP_NUM_THREADS:-} ]]; then                       # share the node's CPUs among its ranks
    cpus=${SLURM_CPUS_ON_NODE:-$GPUS_PER_NODE}
    export OMP_NUM_THREADS=$(( cpus / GPUS_PER_NODE > 0 ? cpus / GPUS_PER_NODE : 1 ))
fi

# signals: the batch shell alone gets `--signal=B:TERM@120`; the node tasks see the stop file
got_signal=""
on_signal() {
    got_signal=$1
    say "received SIG$1: asking the training on every node to save a checkpoint and stop"
    touch "$STOP_FILE"
}
trap 'on_signal TERM' TERM
trap 'on_signal USR1' USR1
trap 'on_signal INT' INT

srun_args=(--nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
[[ -n ${SLURM_CPUS_ON_NODE:-} ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_ON_NODE")
say "srun ${srun_args[*]} bash slurm/node_task.sh"
srun "${srun_args[@]}" bash "$REPO/slurm/node_task.sh" &
srun_pid=$!
while :; do
    wait "$srun_pid"; rc=$?
    # a trapped signal interrupts `wait` (status > 128) while srun keeps running: wait again
    if (( rc > 128 )) && kill -0 "$srun_pid" 2>/dev/null; then continue; fi
    if (( rc > 128 )) && [[ -n $got_signal ]]; then       # srun ended during the trap: fetch its real status
        wait "$srun_pid" 2>/dev/null; r=$?; (( r != 127 )) && rc=$r
    fi
    break
done
say "training exited with status $rc"

# requeue? only when the run stopped early (signal, or train.steps_per_run) and did not reach max_steps
summary=${OUTPUT_DIR:+$OUTPUT_DIR/summary.json}
state=none                                               # none | stopped | finished (this segment's summary.json)
if [[ -n $summary && -f $summary && $summary -nt $HOSTFILE ]]; then
    if grep -Eq '"stopped_early": *true' "$summary"; then state=stopped; else state=finished; fi
fi
requeue=0
if [[ $state == finished ]]; then
    say "training finished (train.max_steps reached, $summary): not requeueing"
elif [[ $state == stopped && $rc == 0 ]] || [[ -n $got_signal ]]; then
    requeue=1
fi
if (( requeue )) && [[ ${DSMOE_REQUEUE:-1} == 0 ]]; then
    say "the run stopped early but DSMOE_REQUEUE=0: not requeueing; resubmit to continue"; requeue=0
fi
if (( requeue )); then
    job_state=$(scontrol show job "$JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | head -1)
    if [[ $job_state == JobState=CANCELLED ]]; then
        say "job was cancelled ($job_state): not requeueing"; requeue=0
    fi
fi
if (( requeue )); then
    say "run stopped early (${got_signal:+SIG$got_signal, }summary: $state): requeueing job $JOB_ID; it resumes from the newest checkpoint in ${OUTPUT_DIR:-train.output_dir}"
    if scontrol requeue "$JOB_ID"; then
        exit 0
    fi
    say "error: scontrol requeue $JOB_ID failed; resubmit the same command to resume"
    exit $(( rc != 0 ? rc : 1 ))
fi
if (( rc != 0 )); then
    say "training failed (status $rc); not requeueing (see the output above)"
elif [[ $state == none && -n $summary ]]; then
    say "warning: no fresh $summary; nothing to requeue"
fi
exit "$rc"
