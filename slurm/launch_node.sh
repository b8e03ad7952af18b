#!/bin/bash
# One launcher per node: torchrun with a c10d rendezvous running `-m megahybrid train CONFIG [overrides]`.
# Started on every node by slurm/common.sh (srun, one task per node), by NeMo-Run (launchers/launch.py), or by
# hand on one machine:   slurm/launch_node.sh configs/tiny/srft_arith.yaml train.steps=2
#
# Environment (all optional; [default]):
#   MEGAHYBRID_HOME      the repository; relative paths are taken from there  [the current directory]
#   MH_NNODES            number of node launchers              [$SLURM_NTASKS, else 1]
#   MH_NPROC_PER_NODE    trainer ranks on this node            [computed from the config by megahybrid.launch.prepare]
#   MH_NODE_PYTHON       Python interpreter                    [$MEGAHYBRID_PYTHON, else python]
#   MH_SETUP             shell lines run first (the cluster profile's `setup`)
#   MASTER_ADDR          rendezvous host                       [first host of $SLURM_JOB_NODELIST, else 127.0.0.1]
#   MASTER_PORT          rendezvous port                       [20000 + $SLURM_JOB_ID % 20000, else 29500]
#   MH_RDZV_ID           rendezvous id outside Slurm           [local-<pid>: set one id for several launchers]
#   MEGAHYBRID_DRY_RUN=1 run the preflight probe (megahybrid/launch/probe.py) instead of training
#   MEGAHYBRID_PROBE_ARGS extra probe arguments, e.g. "--wait-signal 120"
#   MEGAHYBRID_REQUEUE=0 do not requeue the job after a pre-emption signal [1]
#
# Signals. torchrun's agent ignores SIGUSR1 and survives SIGTERM without killing the ranks
# (megahybrid/launch/torchrun.py); the trainer ranks install their own handlers (checkpoint at the next step
# boundary, exit 0). Inside a Slurm step, Slurm delivers a step signal to every process of the step, the ranks
# included; outside one (NeMo-Run local, a shell) this script forwards SIGUSR1/SIGTERM to the ranks itself.
# After a SIGUSR1, once torchrun has exited 0, the job is requeued (`#SBATCH --requeue`; train.resume=auto
# continues from the checkpoint): by the batch shell under slurm/common.sh (MH_REQUEUE_IN_BATCH=1, Slurm's tools
# and munge live there, not in a container), else by the first launcher (SLURM_PROCID 0).
set -uo pipefail

if (($# < 1)); then
    echo "usage: $0 CONFIG [dotted.key=value ...]" >&2
    exit 2
fi
config=$1
shift

if [[ -n ${MEGAHYBRID_HOME:-} ]]; then
    cd "$MEGAHYBRID_HOME" || exit 2  # relative config and run paths are relative to the repository
fi
python=${MH_NODE_PYTHON:-${MEGAHYBRID_PYTHON:-python}}
if [[ -z ${MH_NPROC_PER_NODE:-} ]]; then
    # Not started by common.sh: resolve the layout here (exits 2 on a bad config).
    assignments=$("$python" -m megahybrid.launch.prepare "$config" "$@") || exit $?
    eval "$assignments"
fi
if [[ -n ${MH_SETUP:-} ]]; then
    eval "$MH_SETUP" || { echo "launch_node: cluster setup lines failed" >&2; exit 2; }
fi
nnodes=${MH_NNODES:-${SLURM_NTASKS:-1}}
nproc=${MH_NPROC_PER_NODE}
if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    master_addr=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
    master_port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    rdzv_id=${SLURM_JOB_ID}
else
    master_addr=${MASTER_ADDR:-127.0.0.1}
    master_port=${MASTER_PORT:-29500}
    rdzv_id=${MH_RDZV_ID:-local-$$}  # launchers of one job on one machine share an id (tests)
fi

if [[ ${MEGAHYBRID_DRY_RUN:-0} == 1 ]]; then
    read -r -a probe_args <<<"${MEGAHYBRID_PROBE_ARGS:-}"
    entry=(-m megahybrid.launch.probe --out "${MH_RUN_DIR:-runs/preflight}/preflight" "${probe_args[@]}")
else
    entry=(-m megahybrid train "$config" "$@")
fi

echo "launch_node: $(hostname) procid=${SLURM_PROCID:-0} nnodes=$nnodes nproc_per_node=$nproc" \
    "rdzv=$master_addr:$master_port id=$rdzv_id: ${entry[*]}"

# torchrun (megahybrid/launch/torchrun.py sets its signal dispositions first, see the header)
"$python" -m megahybrid.launch.torchrun --nnodes="$nnodes" --nproc-per-node="$nproc" \
    --rdzv-backend=c10d --rdzv-endpoint="$master_addr:$master_port" --rdzv-id="$rdzv_id" \
    --max-restarts=0 "${entry[@]}" &
torchrun_pid=$!

preempted=0
# shellcheck disable=SC2317  # invoked from the traps below
forward() {
    # Inside a Slurm step the ranks already got the signal from Slurm; a second one would be redundant.
    if [[ -z ${SLURM_STEP_ID:-} ]]; then
        pkill "-$1" -P "$torchrun_pid" || true
    fi
}
trap 'preempted=1; echo "launch_node: SIGUSR1 (pre-emption): ranks checkpoint and exit"; forward USR1' USR1
trap 'forward TERM' TERM

# `wait` returns early (> 128) when a trapped signal arrives: wait again until torchrun itself has exited
# (kill -0 also succeeds on an exited, not yet reaped child, whose status the next wait returns).
while true; do
    wait "$torchrun_pid"
    rc=$?
    ((rc > 128)) && kill -0 "$torchrun_pid" 2>/dev/null && continue
    break
done
echo "launch_node: torchrun exited with $rc"

if ((preempted && rc == 0)) && [[ ${MEGAHYBRID_REQUEUE:-1} == 1 && ${SLURM_PROCID:-0} == 0 ]] \
    && [[ -n ${SLURM_JOB_ID:-} && ${MH_REQUEUE_IN_BATCH:-0} != 1 ]]; then
    echo "launch_node: requeueing job $SLURM_JOB_ID after the pre-emption checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
