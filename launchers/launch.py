"""Launch a megahybrid run with NeMo-Run, from the same YAML as the sbatch scripts.

    python launchers/launch.py configs/srft_7b.yaml [dotted.key=value ...]             # Slurm (the config's cluster)
    python launchers/launch.py configs/srft_7b.yaml --dryrun                          # print the sbatch script
    python launchers/launch.py configs/tiny/srft_arith.yaml train.steps=2 --executor local
    python launchers/launch.py configs/srft_7b.yaml --preflight                       # probe instead of training

The run config is resolved and its layout checked (and printed) before anything is submitted; a bad config exits
2. Slurm runs are detached and polled (no accounting needed); the exit code is 0 only when the run COMPLETED.
Cluster settings come from configs/clusters/<launch.cluster>.yaml (or MEGAHYBRID_CLUSTER); see that file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megahybrid.config.loader import ConfigError, load_config  # noqa: E402
from megahybrid.config.plan import describe_plan  # noqa: E402
from megahybrid.launch.cluster import load_cluster  # noqa: E402
from megahybrid.launch.nemo import LaunchOptions, launch  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="run config YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    parser.add_argument("--executor", choices=["slurm", "local"], default="slurm")
    parser.add_argument("--dryrun", action="store_true", help="print the generated sbatch script / command, submit nothing")
    parser.add_argument("--preflight", action="store_true", help="run the preflight probe instead of training")
    parser.add_argument("--probe-args", default="", help="extra probe arguments, e.g. '--wait-signal 60'")
    parser.add_argument("--no-wait", action="store_true", help="Slurm: submit and return without polling")
    parser.add_argument("--timeout", type=float, default=None, help="Slurm: cancel and fail after this many seconds")
    parser.add_argument("--poll", type=float, default=5.0, help="Slurm: seconds between state polls")
    parser.add_argument("--name", default=None, help="experiment title (default: the run directory's name)")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.config = str(Path(args.config).resolve())  # the nodes start in the repository, not in this directory
    try:
        cfg = load_config(args.config, args.overrides)
        print(describe_plan(cfg), flush=True)
        cluster = load_cluster(cfg.launch.cluster)
        opts = LaunchOptions(executor=args.executor, dryrun=args.dryrun, preflight=args.preflight,
                             probe_args=args.probe_args, wait=not args.no_wait, timeout_s=args.timeout,
                             poll_s=args.poll, name=args.name)
        return launch(args.config, args.overrides, cfg, cluster, opts)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"config error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # NeMo-Run re-imports launch scripts in child processes
    sys.exit(main())
