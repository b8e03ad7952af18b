# shellcheck shell=bash
# Shared body of the sbatch scripts slurm/<recipe>.sh, which hold the #SBATCH lines and then call
#     megahybrid_sbatch_main configs/<recipe>.yaml "$@"
#
# Usage, from the repository root (on a filesystem every node sees):
#     sbatch slurm/srft_7b.sh [dotted.key=value ...]      extra arguments are config overrides for `megahybrid train`
#     sbatch --nodes=1 --gpus-per-node=0 slurm/srft_7b.sh launch.nodes=1 ...   (command-line options beat #SBATCH)
#     MEGAHYBRID_CONFIG=configs/tiny/srft_arith.yaml sbatch ... slurm/srft_7b.sh train.steps=2
#
# What a job does: resolve the config and the layout and print both (also written to the per-job log directory
# <cluster log_dir>/<job name>-<job id>/: config.yaml, plan.txt, node-<task>.log); check them against the
# allocation; then one `srun` task per node runs slurm/launch_node.sh (torchrun, c10d rendezvous at the first
# node). Any task failing ends the whole job (srun --kill-on-bad-exit=1) and the job ends FAILED with its code.
# Pre-emption: `#SBATCH --signal=B:USR1@<s>` signals this batch shell; it forwards SIGUSR1 to the srun step, the
# ranks checkpoint and exit 0, and this shell requeues the job (`#SBATCH --requeue`): here, on the batch host,
# where Slurm's binaries and munge are, not inside a task's container (MH_REQUEUE_IN_BATCH tells launch_node.sh).
#
# Environment, all optional [default]:
#   MEGAHYBRID_HOME      the repository                       [$SLURM_SUBMIT_DIR]
#   MEGAHYBRID_CONFIG    run config instead of the recipe's   [the script's configs/<recipe>.yaml]
#   MEGAHYBRID_SETUP     shell file sourced first (modules, conda, venv)  [$MEGAHYBRID_HOME/.venv/bin/activate if it exists]
#   MEGAHYBRID_PYTHON    Python on the batch host             [python]
#   MEGAHYBRID_CLUSTER   cluster profile name or path         [the config's launch.cluster]
#   MEGAHYBRID_DRY_RUN=1 print config and layout, then run the preflight probe on every node instead of training
#   MEGAHYBRID_REQUEUE=0 do not requeue the job after a pre-emption signal [1]
#   MEGAHYBRID_ALLOW_CPU_TORCH=1 run a GPU allocation although torch here is CPU-only (refused otherwise, exit 2)
#   MEGAHYBRID_PROBE_ARGS, MASTER_PORT: see slurm/launch_node.sh
#   SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS: Slurm's own variables (or sbatch -p/-A/-q) pick partition,
#     account and QOS; container, modules, node setup and exported variables come from the cluster profile
#     (configs/clusters/<name>.yaml, whose values default from MEGAHYBRID_* variables).

megahybrid_die() {
    echo "megahybrid: $*" >&2
    exit 2
}

megahybrid_setup_env() {
    MEGAHYBRID_HOME=${MEGAHYBRID_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
    [[ -f $MEGAHYBRID_HOME/slurm/launch_node.sh ]] ||
        megahybrid_die "MEGAHYBRID_HOME=$MEGAHYBRID_HOME is not the megahybrid repository (submit from its root or set MEGAHYBRID_HOME)"
    cd "$MEGAHYBRID_HOME" || megahybrid_die "cannot cd to $MEGAHYBRID_HOME"
    local setup=${MEGAHYBRID_SETUP:-}
    if [[ -z $setup && -f .venv/bin/activate ]]; then
        setup=.venv/bin/activate
    fi
    if [[ -n $setup ]]; then
        # shellcheck disable=SC1090  # a site file named at run time
        source "$setup" || megahybrid_die "sourcing MEGAHYBRID_SETUP=$setup failed"
    fi
}

# Resolve config + layout + cluster profile (megahybrid/launch/prepare.py); sets and exports the MH_* variables.
megahybrid_prepare() {
    local python=${MEGAHYBRID_PYTHON:-python} assignments rc
    assignments=$("$python" -m megahybrid.launch.prepare --log-dir auto "$@")
    rc=$?
    ((rc == 0)) || { echo "megahybrid: config/layout check failed (exit $rc); nothing was started" >&2; exit "$rc"; }
    eval "$assignments"
    export MH_NNODES MH_NPROC_PER_NODE MH_RUN_DIR MH_NODE_PYTHON MH_SETUP MH_JOB_LOG_DIR
    echo "===== resolved config ($MH_JOB_LOG_DIR/config.yaml)"
    cat "$MH_JOB_LOG_DIR/config.yaml"
    echo "===== layout ($MH_JOB_LOG_DIR/plan.txt)"
    cat "$MH_JOB_LOG_DIR/plan.txt"
}

megahybrid_load_modules() {
    [[ -z ${MH_MODULES:-} ]] && return 0
    command -v module >/dev/null 2>&1 || megahybrid_die "cluster profile $MH_CLUSTER lists modules ($MH_MODULES) but 'module' is not available"
    local mod
    for mod in $MH_MODULES; do
        module load "$mod" || megahybrid_die "module load $mod failed"
    done
}

megahybrid_srun_args() {
    srun_args=(--kill-on-bad-exit=1 --output="$MH_JOB_LOG_DIR/node-%t.log")
    if [[ -n ${MH_CONTAINER_IMAGE:-} ]]; then
        local mounts=$MEGAHYBRID_HOME:$MEGAHYBRID_HOME
        [[ -n ${MH_CONTAINER_MOUNTS:-} ]] && mounts+=",$MH_CONTAINER_MOUNTS"
        srun_args+=(--container-image="$MH_CONTAINER_IMAGE" --container-mounts="$mounts"
            --container-workdir="$MEGAHYBRID_HOME")
    fi
}

megahybrid_tail_logs() {
    local log
    for log in "$MH_JOB_LOG_DIR"/node-*.log; do
        [[ -f $log ]] || continue
        echo "===== last lines of $log"
        tail -n 40 "$log"
    done
}

megahybrid_sbatch_main() {
    local recipe=$1
    shift
    set -uo pipefail
    [[ -n ${SLURM_JOB_ID:-} ]] || megahybrid_die "submit with sbatch (no SLURM_JOB_ID); for one machine use slurm/launch_node.sh"
    megahybrid_setup_env
    local config=${MEGAHYBRID_CONFIG:-$recipe}
    echo "megahybrid: job $SLURM_JOB_ID ($SLURM_JOB_NAME) on $SLURM_JOB_NUM_NODES node(s): $config $*"
    megahybrid_prepare "$config" "$@"
    megahybrid_load_modules

    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
    echo "===== launching: rendezvous $MASTER_ADDR:$MASTER_PORT, $MH_NNODES node launcher(s) x $MH_NPROC_PER_NODE rank(s);" \
        "node logs in $MH_JOB_LOG_DIR/node-<task>.log"

    local srun_args
    megahybrid_srun_args
    MH_REQUEUE_IN_BATCH=1 srun "${srun_args[@]}" bash slurm/launch_node.sh "$config" "$@" &
    local srun_pid=$! preempted=0
    # The B: signal reaches only this shell: pass it on to the step (srun forwards it to every task process).
    trap 'preempted=1; echo "megahybrid: SIGUSR1 (pre-emption), forwarding to the job step"; kill -USR1 "$srun_pid"' USR1
    # On cancel Slurm signals the step itself; keep waiting so the ranks can finish their checkpoint.
    trap 'echo "megahybrid: SIGTERM, waiting for the job step"' TERM

    local rc
    while true; do
        wait "$srun_pid"
        rc=$?
        ((rc > 128)) && kill -0 "$srun_pid" 2>/dev/null && continue
        break
    done
    if ((rc != 0)); then
        megahybrid_tail_logs
        echo "megahybrid: job step failed with exit code $rc" >&2
    else
        echo "megahybrid: job step completed"
        if ((preempted)) && [[ ${MEGAHYBRID_REQUEUE:-1} == 1 ]]; then
            echo "megahybrid: requeueing job $SLURM_JOB_ID after the pre-emption checkpoint"
            scontrol requeue "$SLURM_JOB_ID" || echo "megahybrid: scontrol requeue $SLURM_JOB_ID failed" >&2
        fi
    fi
    exit "$rc"
}
