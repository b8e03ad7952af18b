"""NeMo-Run launch: build `run.SlurmExecutor` / `run.LocalExecutor` from a run config + cluster profile and run
`slurm/launch_node.sh CONFIG [overrides]` (one per node: torchrun -m megahybrid train) as a `run.Script`.

The same per-node launcher as the sbatch scripts, so rendezvous, signal handling and requeue behave the same.
ENVIRONMENT.md pitfalls handled here: NEMORUN_HOME is set before `nemo_run` is imported and must not contain
`/nemo_run`; `container_image=None` (never ""); Slurm runs are detached and polled with `scontrol`/`squeue`
(NeMo-Run's own status needs sacct, i.e. accounting); a finished run's state is read back, never assumed, and
anything but COMPLETED/SUCCEEDED is a non-zero exit. Callers need an `if __name__ == "__main__":` guard.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from megahybrid.config.loader import ConfigError
from megahybrid.config.schema import RunConfig
from megahybrid.launch.cluster import ClusterProfile

REPO = Path(__file__).resolve().parents[2]
NODE_LAUNCHER = REPO / "slurm" / "launch_node.sh"
SLURM_DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
              "DEADLINE", "PREEMPTED"}
SUCCESS = {"COMPLETED", "SUCCEEDED"}


@dataclass
class LaunchOptions:
    executor: str = "slurm"
    """`slurm` or `local`."""
    dryrun: bool = False
    """Print what would be submitted (the sbatch script for Slurm) and stop."""
    preflight: bool = False
    """Run the preflight probe (megahybrid/launch/probe.py) instead of training."""
    probe_args: str = ""
    """Extra probe arguments, e.g. `--wait-signal 60`."""
    wait: bool = True
    """Slurm: poll until the job ends and exit with its outcome (False: submit and return)."""
    timeout_s: float | None = None
    """Slurm: give up waiting (and cancel) after this many seconds; None = no limit."""
    poll_s: float = 5.0
    """Slurm: seconds between state polls."""
    name: str | None = None
    """Experiment title; default from the run directory's name."""


def nemorun_home(cluster: ClusterProfile) -> Path:
    home = Path(cluster.nemo_run_home or os.environ.get("NEMORUN_HOME") or REPO / ".nemo_runs").resolve()
    if "/nemo_run" in str(home):
        raise ConfigError([f"cluster {cluster.name}: NeMo-Run home {home} contains '/nemo_run', which NeMo-Run "
                           f"mistakes for its package path (ENVIRONMENT.md); choose another directory"])
    return home


def task_env(cfg: RunConfig, cluster: ClusterProfile, opts: LaunchOptions) -> dict[str, str]:
    """Environment of every node launcher; the MH_* layout values spare each node re-resolving the config."""
    from megahybrid.launch.prepare import nproc_per_node

    env = {"MEGAHYBRID_HOME": str(REPO), "MH_NODE_PYTHON": cluster.python, "MH_NNODES": str(cfg.launch.nodes),
           "MH_NPROC_PER_NODE": str(nproc_per_node(cfg)), "MH_RUN_DIR": cfg.train.run_dir, **cluster.env}
    if cluster.setup:
        env["MH_SETUP"] = "\n".join(cluster.setup)
    if opts.preflight:
        env["MEGAHYBRID_DRY_RUN"] = "1"
        if opts.probe_args:
            env["MEGAHYBRID_PROBE_ARGS"] = opts.probe_args
    return env


def build_task(config: str, overrides: list[str]):
    import nemo_run as run

    return run.Script(path=str(NODE_LAUNCHER), args=[config, *overrides], entrypoint="bash")


def build_slurm_executor(cfg: RunConfig, cluster: ClusterProfile, home: Path, env: dict[str, str], title: str):
    import nemo_run as run

    launch = cfg.launch
    optional = {k: v for k, v in (("partition", cluster.partition), ("qos", cluster.qos),
                                  ("gpus_per_node", launch.gpus_per_node or None)) if v}
    return run.SlurmExecutor(
        account=cluster.account,  # None: the user's default account (no --account line)
        nodes=launch.nodes, ntasks_per_node=1, time=launch.time_limit, exclusive=True,
        # Not B: (batch shell only): NeMo-Run's batch script cannot trap it; the step signal reaches
        # launch_node.sh and the ranks, and launch_node.sh requeues after the checkpoint.
        signal=f"USR1@{launch.preempt_signal_s}",
        additional_parameters={"requeue": True},
        # srun --kill-on-bad-exit=1 (one rank's failure ends the job) is NeMo-Run's default; the dryrun test checks it.
        container_image=cluster.container_image or None,
        container_mounts=[f"{REPO}:{REPO}", *cluster.container_mounts] if cluster.container_image else [],
        job_name_prefix=f"{title}.",
        # NeMo-Run writes `export K=V` unquoted into the sbatch script
        env_vars={k: shlex.quote(v) for k, v in env.items()},
        tunnel=run.LocalTunnel(job_dir=str(home / "experiments")),
        packager=run.Packager(),
        **optional,
    )


def build_local_executor(env: dict[str, str]):
    import nemo_run as run

    return run.LocalExecutor(ntasks_per_node=1, env_vars=env)


def slurm_job_id(handle: str) -> str:
    """NeMo-Run's Slurm app handle ends with the job id (`<scheduler>://<session>/<job id>`)."""
    job_id = handle.rstrip("/").rsplit("/", 1)[-1]
    if not job_id.isdigit():
        raise RuntimeError(f"cannot read a Slurm job id from NeMo-Run handle {handle!r}")
    return job_id


def slurm_state(job_id: str) -> str | None:
    """The job's state from scontrol (squeue as fallback); None once Slurm has forgotten the job."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if proc.returncode == 0:
        for token in proc.stdout.split():
            if token.startswith("JobState="):
                return token.split("=", 1)[1]
    proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def wait_slurm(job_id: str, timeout_s: float | None, poll_s: float) -> str:
    """Poll until the job reaches a final state; on timeout cancel it and report TIMEOUT_WAITING."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    while deadline is None or time.monotonic() < deadline:
        state = slurm_state(job_id)
        if state != last:
            print(f"megahybrid: Slurm job {job_id}: {state}", flush=True)
            last = state
        if state in SLURM_DONE:
            return state
        if state is None:
            return "UNKNOWN"
        time.sleep(poll_s)
    subprocess.run(["scancel", job_id], capture_output=True)
    return "TIMEOUT_WAITING"


def local_state(exp_id: str) -> str:
    import nemo_run as run

    status = run.Experiment.from_id(exp_id).status(return_dict=True) or {}
    states = [str(job.get("status", "UNKNOWN")).rsplit(".", 1)[-1] for job in status.values()]
    return states[0] if len(states) == 1 else ",".join(states) or "UNKNOWN"


def launch(config: str, overrides: list[str], cfg: RunConfig, cluster: ClusterProfile, opts: LaunchOptions) -> int:
    """Submit/run; returns the process exit code (0 only when the run ended COMPLETED/SUCCEEDED)."""
    home = nemorun_home(cluster)
    os.environ["NEMORUN_HOME"] = str(home)  # before nemo_run is imported: it reads it at import time
    import nemo_run as run

    run.config.set_nemorun_home(str(home))
    title = opts.name or Path(cfg.train.run_dir).name or "megahybrid"
    env = task_env(cfg, cluster, opts)
    if opts.executor == "slurm":
        executor = build_slurm_executor(cfg, cluster, home, env, title)
    elif opts.executor == "local":
        executor = build_local_executor(env)
    else:
        raise ConfigError([f"--executor: expected 'slurm' or 'local', got {opts.executor!r}"])
    with run.Experiment(title, executor=executor, log_level="WARN") as exp:
        exp.add(build_task(config, overrides), name="train")
        if opts.dryrun:
            # Print the script ourselves, unwrapped: NeMo-Run's own dryrun log goes through a rich console that
            # wraps long srun lines at the terminal width, so the printed script could not be copied and run.
            exp.dryrun(log=False)
            for job in exp.jobs:
                print(f"# NeMo-Run task {job.id}: what would be submitted\n{job._dryrun_info!r}", flush=True)
            return 0
        exp.run(detach=opts.executor == "slurm", tail_logs=False)
        exp_id, handle, job_dir = exp._id, exp.jobs[0].handle, exp.jobs[0].executor.job_dir
    print(f"megahybrid: NeMo-Run logs of this run: {job_dir}", flush=True)
    if opts.executor == "local":
        state = local_state(exp_id)
    else:
        job_id = slurm_job_id(handle)
        print(f"megahybrid: submitted Slurm job {job_id} (experiment {exp_id}, NEMORUN_HOME={home})", flush=True)
        if not opts.wait:
            return 0
        state = wait_slurm(job_id, opts.timeout_s, opts.poll_s)
    print(f"megahybrid: experiment {exp_id} finished: {state}", flush=True)
    return 0 if state in SUCCESS else 1

