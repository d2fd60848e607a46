# shellcheck shell=bash
# What the sbatch recipes share; they source this file from the repository root. It is the one place that knows
# how a stop signal reaches the trainer and when a stopped job is requeued.
#
# How a stop reaches the trainer (seen on Slurm 22.05; tests/test_slurm.py runs the first two cases):
# - The recipes ask for `--signal=B:USR1@SECS`: SECS before the time limit Slurm sends SIGUSR1 to the batch shell
#   alone. The shell passes it on to the training step's srun (sapo_on_signal), and srun has slurmstepd signal
#   every process of that step. Each trainer rank sets its stop flag; after the current step the ranks agree, write
#   a checkpoint and exit 0 with the MLflow run marked KILLED. The shell then requeues the job (scontrol requeue)
#   when the run has not reached trainer.steps and the job is requeueable (the recipes ask for --requeue; sbatch
#   --no-requeue turns that off), and the requeued job resumes from output_dir/checkpoints/latest in the same
#   MLflow run. SECS must cover one RL step and a checkpoint. A warning that comes before the training has started
#   keeps it from starting, and the job is requeued. `scancel --batch --signal=USR1 JOBID` sends the warning by hand.
# - scancel, preemption and node shutdown send SIGTERM to every process of the job, and SIGKILL KillWait seconds
#   later (30 s by default; GraceTime for preemption). The trainer stops the same way if its current step and the
#   checkpoint fit in that time; srun exits at once, so what the trainer prints after the signal is missing from the
#   job log. The batch shell neither passes SIGTERM on (srun answers a SIGTERM of its own by killing the tasks with
#   SIGKILL at once) nor requeues: a cancelled job stays cancelled, and a preempting Slurm with PreemptMode=REQUEUE
#   requeues the job itself.
# - `scancel --signal=USR1 JOBID` or `--signal=TERM` (without --batch) signal the steps only: the run stops cleanly
#   and the job ends, not requeued.
# - Every process of the step gets the signal, the trainer's own children too, so they must not die of it (the
#   reward workers ignore both). torchrun does not fit in between: its agent dies of SIGUSR1 (it handles SIGTERM,
#   SIGINT, SIGHUP and SIGQUIT only), which fails the step, and on SIGTERM it kills its workers 30 s later and exits
#   1. The recipes start one trainer process per task with srun instead (rank, world size and local rank from
#   SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID).
# - A rank killed, stopped or lost with its node: the others exit 75 after trainer.rank_timeout_s (default 120 s), so
#   --kill-on-bad-exit=1 ends the step and the job fails; a resubmitted job resumes from the last checkpoint.

sapo_die() {
    echo "${SLURM_JOB_NAME:-sbatch recipe}: $*" >&2
    exit 2
}

sapo_resolve_config() {  # CONFIG [KEY=VALUE ...]: check the config and keep it resolved in SAPO_CONFIG_YAML
    [[ -n ${SLURM_JOB_ID:-} ]] || sapo_die "run this script through sbatch"
    command -v megatron-sapo >/dev/null ||
        sapo_die "megatron-sapo is not on PATH: activate the project's environment before sbatch (it passes PATH on)"
    SAPO_CONFIG_YAML=$(megatron-sapo train "$@" --print-config) || sapo_die "invalid config (above): nothing started"
    local model
    model=$(sapo_config policy.model_path)
    [[ -f $model/config.json ]] || sapo_die "policy.model_path $model is not a Hugging Face model folder"
}

sapo_count() {  # NAME VALUE: VALUE when it is a whole number >= 1
    [[ $2 =~ ^[1-9][0-9]*$ ]] || sapo_die "$1 must be a whole number >= 1, got '$2'"
    echo "$2"
}

# KEY: a value of the resolved config, e.g. trainer.steps; a list one item a line, a mapping one KEY=VALUE a line,
# null as ""
sapo_config() {
    python3 -c 'import sys, yaml
value = yaml.safe_load(sys.stdin)
for key in sys.argv[1].split("."):
    value = value[key]
if isinstance(value, dict):
    value = [f"{k}={v}" for k, v in value.items()]
for item in value if isinstance(value, list) else [value]:
    print("" if item is None else item)' "$1" <<<"$SAPO_CONFIG_YAML"
}

sapo_nodes() {  # the allocation's host names, one a line
    scontrol show hostnames "$SLURM_JOB_NODELIST"
}

sapo_default_port() {  # a port per job, so that jobs sharing a node do not collide
    echo $((20000 + SLURM_JOB_ID % 20000))
}

sapo_on_signal() {  # SIGNAL: remember it; pass SIGUSR1 on to the training step (Slurm signals it itself on SIGTERM)
    SAPO_STOP_SIGNAL=$1
    echo "$(date -Is) batch shell: SIG$1" >&2
    if [[ $1 == USR1 && -n $SAPO_TRAIN_PID ]]; then
        kill -s USR1 "$SAPO_TRAIN_PID" 2>/dev/null || true
    fi
}

SAPO_STOP_SIGNAL=""
SAPO_TRAIN_PID=""
trap 'sapo_on_signal USR1' USR1
trap 'sapo_on_signal TERM' TERM

sapo_train() {  # SRUN_ARGUMENTS... COMMAND...: srun the training, passing SIGUSR1 on; returns srun's exit status
    if [[ -n $SAPO_STOP_SIGNAL ]]; then
        echo "SIG$SAPO_STOP_SIGNAL came before the training started: not starting it"
        return 0
    fi
    # each task takes its rank from SLURM_PROCID: a RANK / WORLD_SIZE / LOCAL_RANK inherited from the submitting
    # shell (e.g. one inside another distributed job) would make every task rank 0 of a world of one
    unset RANK WORLD_SIZE LOCAL_RANK
    srun "$@" &
    SAPO_TRAIN_PID=$!
    local status
    while :; do
        status=0
        wait "$SAPO_TRAIN_PID" || status=$?
        # a trapped signal interrupts wait while srun goes on
        kill -0 "$SAPO_TRAIN_PID" 2>/dev/null || break
    done
    return "$status"
}

sapo_requeue_if_stopped() {  # after sapo_train: requeue a run that the time-limit warning stopped before its end
    [[ $SAPO_STOP_SIGNAL == USR1 ]] || return 0
    local out steps latest step
    out=$(sapo_config output_dir)
    steps=$(sapo_config trainer.steps)
    latest=$(cat "$out/checkpoints/latest" 2>/dev/null || echo step_0)  # none yet: stopped before its first
    step=$((10#${latest#step_}))
    if ((step >= steps)); then
        echo "the run reached step $step of $steps: not requeueing"
    elif ! scontrol show job "$SLURM_JOB_ID" | grep -qw 'Requeue=1'; then
        echo "stopped at step $step of $steps; the job is not requeueable: resubmit it to resume"
    else
        echo "stopped at step $step of $steps: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
}
