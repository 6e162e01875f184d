# Shared by the sbatch scripts (sourced from the submit directory, the repository root).

# Rendezvous of a multi-node job, the same on every node: machine rank from SLURM's node id, the main
# address from the first host of the node list, a port derived from the job id (free of other jobs
# on the same nodes unless they share id modulo 20000).
lrd_rendezvous() {
    local first
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    # the node's address as SLURM knows it (NodeAddr: the node name unless the cluster says otherwise)
    MAIN_ADDR=$(scontrol show node "$first" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    MAIN_ADDR=${MAIN_ADDR:-$first}
    MAIN_PORT=$((20000 + SLURM_JOB_ID % 20000))
    MACHINE_RANK=${SLURM_NODEID:-0}
    NUM_MACHINES=${SLURM_NNODES:-1}
    export MAIN_ADDR MAIN_PORT MACHINE_RANK NUM_MACHINES
}

# The run directory survives requeues: a requeued job keeps its job id (arrays: id and task).
# RUN_DIR set at submission continues that run in a new job (after a lost node, or on other nodes).
lrd_run_dir() {
    local name=${SLURM_JOB_NAME:-lrd}
    if [[ -n "${RUN_DIR:-}" ]]; then
        echo "$RUN_DIR"
    elif [[ -n "${SLURM_ARRAY_JOB_ID:-}" ]]; then
        echo "${RUNS_DIR:-runs/slurm}/${name}-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    else
        echo "${RUNS_DIR:-runs/slurm}/${name}-${SLURM_JOB_ID}"
    fi
}

# The run directory, its log folder, and the file the main rank writes once it stopped for a
# signal after a complete checkpoint (lrd_dist.train.preemption), one per attempt of the job.
lrd_setup_run() {
    RUN_DIR=$(lrd_run_dir)
    mkdir -p "$RUN_DIR/logs"
    export LRD_DIST_PREEMPTED_FILE="$RUN_DIR/.preempted-${SLURM_JOB_ID}-${SLURM_RESTART_COUNT:-0}"
}

# 75 = the trainer checkpointed on a signal (lrd_dist.train.preemption.REQUEUE_EXIT_CODE): requeue.
# The ranks leave at slightly different times after that checkpoint, and `srun --kill-on-bad-exit`
# kills the slower ones as soon as one exits 75, so srun itself may return 143: the main rank's
# preemption file, written before the ranks meet for the last time, tells such an exit from a crash.
# A signal that lands after training finished (results.json written, the ranks exiting) is not a
# reason to fail the job.
lrd_finish() {
    local code=$1 run_dir=$2
    if [[ $code -ne 0 && $code -ne 75 && -f "${LRD_DIST_PREEMPTED_FILE:-/nonexistent}" ]]; then
        echo "$(date -Is) job $SLURM_JOB_ID: exit code $code after the main rank checkpointed for a signal ($LRD_DIST_PREEMPTED_FILE)"
        code=75
    fi
    if [[ $code -ne 0 && $code -ne 75 && -f "$run_dir/results.json" && "$run_dir/results.json" -nt "$run_dir/config.yaml" ]]; then
        echo "$(date -Is) job $SLURM_JOB_ID: exit code $code after the run completed ($run_dir/results.json)"
        code=0
    fi
    if [[ $code -eq 75 ]] && ! lrd_progressed "$run_dir"; then
        echo "$(date -Is) job $SLURM_JOB_ID: no new checkpoint in ${LRD_MAX_IDLE_REQUEUES:-3} requeues in a row: not requeued again (see the log of each attempt)"
        exit 1
    fi
    if [[ $code -eq 75 ]]; then
        echo "$(date -Is) job $SLURM_JOB_ID stopped for a signal after a checkpoint: requeueing"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "$(date -Is) job $SLURM_JOB_ID finished with exit code $code"
    exit "$code"
}

# Whether the run wrote a new complete checkpoint since the previous requeue; a job that requeues
# LRD_MAX_IDLE_REQUEUES (3) times in a row without one (a server down for hours, a fault that comes
# back on every start) stops instead of looping. The count lives in the run directory.
lrd_progressed() {
    local run_dir=$1 newest="" previous="" idle=0
    newest=$(ls -d "$run_dir"/checkpoints/step-*/COMPLETE 2>/dev/null | sort | tail -n 1)
    if [[ -f "$run_dir/.requeue-progress" ]]; then
        read -r previous idle < "$run_dir/.requeue-progress"
    fi
    if [[ "$newest" == "${previous:-}" ]]; then idle=$((idle + 1)); else idle=0; fi
    echo "${newest:-none} $idle" > "$run_dir/.requeue-progress"
    [[ $idle -lt ${LRD_MAX_IDLE_REQUEUES:-3} ]]
}

lrd_python() {
    if [[ -x "${LRD_DIST_PYTHON:-}" ]]; then echo "$LRD_DIST_PYTHON"
    elif [[ -x .venv/bin/python ]]; then echo "$PWD/.venv/bin/python"
    else command -v python3; fi
}
