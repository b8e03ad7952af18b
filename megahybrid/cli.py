"""`megahybrid` command line: config check, train, eval, export, compare, plan, data make.

Configuration errors exit with code 2 and one line per problem naming the dotted key (and the file); bad data
(a missing file, a malformed row, an over-long prompt) exits with code 2 and one line naming file:line:field; bad
`data make` arguments exit with code 2 and a line naming the option.
"""
from __future__ import annotations

import argparse
import os
import sys

from megahybrid.config.loader import ConfigError, dump_yaml, load_config

EXIT_CONFIG_ERROR = 2


def _config_check(args: argparse.Namespace) -> int:
    from megahybrid.config.compare import is_compare_file, load_compare

    if is_compare_file(args.config):
        spec = load_compare(args.config, args.overrides)
        for label, cfg in spec.runs.items():
            sys.stdout.write(f"# --- method: {label}\n{dump_yaml(cfg)}")
        return 0
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_yaml(cfg))
    return 0


def _train(args: argparse.Namespace) -> int:
    from megahybrid.training.entry import run_training

    return run_training(args.config, args.overrides, fresh=args.fresh)


def _eval(args: argparse.Namespace) -> int:
    from megahybrid.training.evaluate_checkpoint import run_eval

    return run_eval(args.config, args.overrides, checkpoint=args.checkpoint, model=args.model)


def _export(args: argparse.Namespace) -> int:
    from megahybrid.training.export import run_export

    return run_export(args.checkpoint, args.out, config=args.config, overrides=args.overrides, force=args.force)


def _compare(args: argparse.Namespace) -> int:
    from megahybrid.training.compare import run_comparison

    return run_comparison(args.config, args.overrides)


def _plan(args: argparse.Namespace) -> int:
    from megahybrid.config.plan import describe_plan

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(describe_plan(cfg) + "\n")
    return 0


def _int_in(low: int, high: int | None = None):
    """argparse type: an integer in [low, high]; argparse reports a bad one with the option's name, exit code 2."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {value}")
        return value
    return parse


def _data_make(args: argparse.Namespace) -> int:
    from megahybrid.data import gym
    from megahybrid.data.loaders import write_jsonl

    if args.task == "knights_knaves":
        low, high = args.min_people or 3, args.max_people or 7  # SASR section 4.2's training range
        if low > high:
            print(f"megahybrid data make: error: --min-people {low} is above --max-people {high}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        examples = gym.generate_knights_knaves(args.num, min_people=low, max_people=high, seed=args.seed)
    else:
        if args.min_people is not None or args.max_people is not None:
            print(f"megahybrid data make: error: --min-people/--max-people apply to knights_knaves, not {args.task}",
                  file=sys.stderr)
            return EXIT_CONFIG_ERROR
        examples = gym.generate_gsm_symbolic(args.num, seed=args.seed)
    count = write_jsonl(examples, args.out)
    print(f"wrote {count} {args.task} records to {args.out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megahybrid", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", help="experiment YAML")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 optim.lr=1e-5")
        p.set_defaults(fn=fn)
        return p

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a config and print the resolved YAML")
    check.add_argument("config")
    check.add_argument("overrides", nargs="*")
    check.set_defaults(fn=_config_check)

    train = add("train", _train, "run training (single process or under torchrun)")
    train.add_argument("--fresh", action="store_true",
                       help="start from step 0: an existing train.run_dir is moved aside to <run_dir>.old-<time>")
    ev = add("eval", _eval, "evaluate a checkpoint or a Hugging Face model on the held-out split (avg@k / pass@k)")
    ev.add_argument("--checkpoint", help="checkpoint directory (or a run directory: newest; an HF folder works too)")
    ev.add_argument("--model", help="Hugging Face folder (the base model, an export) or builtin:NAME")
    export = sub.add_parser("export", help="write a checkpoint (any TP/PP layout) as a Hugging Face folder")
    export.add_argument("checkpoint", help="checkpoint directory, or a run directory (its newest checkpoint)")
    export.add_argument("--out", required=True, help="Hugging Face folder to write (appears whole or not at all)")
    export.add_argument("--config", help="run config (default: the run directory's config.yaml)")
    export.add_argument("--force", action="store_true", help="replace an existing --out folder")
    export.add_argument("overrides", nargs="*", help="dotted overrides of the run config")
    export.set_defaults(fn=_export)
    add("compare", _compare, "run several methods with the same budget and write comparison.md + plots")
    add("plan", _plan, "print the parallel layout and per-GPU memory estimate of a config")

    from megahybrid.data.gym import MAX_PEOPLE, TASKS

    data = sub.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    make = data_sub.add_parser("make", help="write reasoning-gym problems as JSONL (needs megahybrid[gym])")
    make.add_argument("task", choices=TASKS)
    make.add_argument("--out", required=True, help="JSONL file to write (replaced atomically)")
    make.add_argument("--num", type=_int_in(1), default=1000, help="number of problems (default 1000)")
    make.add_argument("--seed", type=_int_in(0), default=0, help="generator seed (default 0)")
    make.add_argument("--min-people", type=_int_in(2, MAX_PEOPLE), help="knights_knaves: fewest people (default 3)")
    make.add_argument("--max-people", type=_int_in(2, MAX_PEOPLE), help="knights_knaves: most people (default 7)")
    make.set_defaults(fn=_data_make)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # options may sit between overrides (`train CFG a=1 --fresh b=2`): argparse leaves the overrides after an
    # option unparsed, so collect them here; anything else unknown is still an error (exit 2)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    from megahybrid.data.records import DataError

    # under torchrun / Slurm every rank meets the same bad input: global rank 0 alone says so
    speaks = os.environ.get("RANK", "0") == "0"
    try:
        return int(args.fn(args) or 0)
    except ConfigError as exc:
        for line in exc.problems if speaks else []:
            print(f"config error: {line}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except DataError as exc:
        if speaks:
            print(f"data error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main())
