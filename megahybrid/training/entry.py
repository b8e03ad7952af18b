"""`megahybrid train` / `megahybrid eval`: config -> processes -> Trainer, and the run's closing line.

Outside torchrun/Slurm, the `megahybrid train` command becomes a small launcher (launch_local.py) that starts the
ranks, one with `parallel.world_size: 1`, watches them (a rank killed by a signal, e.g. by the OOM killer, is named,
and no engine or reward worker outlives it) and prints the closing line after they have all exited, so it is the
last line of output. A program that calls `run_training` itself trains a world of 1 in its own process.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from megahybrid.config.loader import load_config
from megahybrid.config.schema import RunConfig
from megahybrid.training.run_dir import atomic_write_text

FINAL_FILE = "final.json"
_LOCAL_CHILD_ENV = "MEGAHYBRID_LOCAL_LAUNCH"


def run_training(config_path: str, overrides: list[str], *, fresh: bool = False) -> int:
    from megahybrid.training.launch_local import die_with_launcher, launch

    die_with_launcher()  # a rank of the local launcher ends with it
    cfg = load_config(config_path, overrides)
    if cfg.stages:
        return run_stages(cfg, config_path)
    run_dir = Path(cfg.train.run_dir)
    if not fresh and report_if_complete(cfg):
        return 0
    world = cfg.parallel.world_size or 1
    launching = _launches_ranks(world)
    # a single rank checks its inputs and sets an old run aside itself, as it did in this process (which then
    # imports no torch: it only watches); several ranks are checked here, once, before any of them starts
    if not (launching and world == 1):
        check_inputs(cfg)  # bad data exits 2 here, before any rank, engine or run-directory file exists
        if fresh and is_rank0_process():
            set_aside(run_dir)
    if launching:
        os.environ[_LOCAL_CHILD_ENV] = "1"
        start = time.time()
        code = launch(world, ["train", *(["--fresh"] if fresh and world == 1 else []), config_path, *overrides])
        if code == 0:
            print_final_line(run_dir, start)
        return code
    return _train_this_rank(cfg, print_final=os.environ.get(_LOCAL_CHILD_ENV) != "1")


def _launches_ranks(world: int) -> bool:
    """Whether this process starts the ranks (launch_local.py) rather than train itself: outside torchrun/Slurm,
    for a world of several ranks, and for a world of 1 when this process is the `megahybrid` command, whose rank
    (`python -m megahybrid train ...`) then runs what this process would have run. A program that calls
    `run_training` itself (e.g. a test that patches the Trainer first) trains a world of 1 in its own process."""
    from megahybrid.training.launch_local import under_distributed_launcher

    if under_distributed_launcher():
        return False
    if world > 1:
        return True
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    # `python -m megahybrid` (what the launcher runs), or the console script `megahybrid`
    return (spec is not None and spec.name == "megahybrid.__main__") or Path(sys.argv[0]).name == "megahybrid"


def is_rank0_process() -> bool:
    """True outside torchrun/Slurm and on global rank 0 under them (who prints one-off messages)."""
    return os.environ.get("RANK", "0") == "0"


def report_if_complete(cfg: RunConfig) -> bool:
    """A run directory whose final.json already covers `train.steps` is finished: report its recorded result
    (instead of resuming, training nothing and printing nan) and say how to start again. True if so."""
    run_dir = Path(cfg.train.run_dir)
    final_path = run_dir / FINAL_FILE
    if cfg.train.resume != "auto" or not final_path.exists():
        return False
    try:
        final = json.loads(final_path.read_text())
        done = int(final["steps"])
    except (ValueError, KeyError, TypeError):
        return False  # unreadable record: let the ranks resume from the checkpoints and rewrite it
    if done < cfg.train.steps:
        return False
    if is_rank0_process():
        fewer = (f"train.steps={cfg.train.steps} is fewer than the {done} steps this run already has; "
                 if cfg.train.steps < done else "")
        print(f"[megahybrid] {fewer}{run_dir} is already complete ({done} steps): nothing to train. "
              f"To train again from scratch add --fresh (the old run is kept as {run_dir}.old-<time>) "
              f"or set train.run_dir=<new dir>.", file=sys.stderr, flush=True)
        print(final_line(final, wall_s=0.0) + f" (already complete; from {final_path})", flush=True)
    return True


def set_aside(run_dir: Path) -> None:
    """--fresh: move an existing run directory out of the way (never delete a user's checkpoints)."""
    if not run_dir.exists():
        return
    target = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 1
    while target.exists():
        target, suffix = target.with_name(f"{target.name.split('~')[0]}~{suffix}"), suffix + 1
    run_dir.rename(target)
    print(f"[megahybrid] --fresh: moved the previous run to {target}", file=sys.stderr, flush=True)


def check_inputs(cfg: RunConfig) -> None:
    """Load the data exactly as the ranks will (rows, templates, token lengths) so a bad file, row or prompt
    raises DataError / ConfigError in this one process. A random-init model's char tokenizer is built in a
    temporary folder, so nothing is written to the run directory."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="megahybrid-check-") as tmp:
        prepare_data(cfg, load_tokenizer(cfg, Path(tmp)))


def run_stages(cfg: RunConfig, config_path: str) -> int:
    """A curriculum (`stages:`, e.g. SRL then RLVR): each stage is a full run in its own run directory that starts
    from the previous stage's final weights. A finished stage (its final.json) is skipped, so a re-submitted job
    continues with the first unfinished stage (which itself resumes from its newest checkpoint)."""
    import dataclasses

    from megahybrid.config.loader import dump_yaml
    from megahybrid.config.plan import stage_configs

    previous: RunConfig | None = None
    for index, stage in enumerate(stage_configs(cfg, config_path)):
        run_dir = Path(stage.train.run_dir)
        if previous is not None:
            prev_dir = Path(previous.train.run_dir)
            weights = Path(previous.rollout.sync_dir or prev_dir / "weights")
            tokenizer = previous.model.tokenizer or previous.model.hf_path or str(prev_dir / "tokenizer")
            stage = dataclasses.replace(stage, model=dataclasses.replace(stage.model, hf_path=str(weights),
                                                                         tokenizer=tokenizer))
        previous = stage
        if _stage_finished(run_dir, stage):
            print(f"[megahybrid] stage {index}: already finished in {run_dir}", file=sys.stderr, flush=True)
            continue
        print(f"[megahybrid] stage {index}: {stage.algorithm.name} in {run_dir}", file=sys.stderr, flush=True)
        if _launches_ranks(stage.parallel.world_size or 1):
            stage_file = run_dir.parent / f"{run_dir.name}.stage.yaml"
            stage_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(stage_file, dump_yaml(stage))
            code = run_training(str(stage_file), [])
        else:
            code = _train_this_rank(stage, print_final=os.environ.get(_LOCAL_CHILD_ENV) != "1")
        if code != 0:
            return code
        if not _stage_finished(run_dir, stage):  # pre-empted: stop here, a re-submission continues this stage
            return 0
    return 0


def _stage_finished(run_dir: Path, stage: RunConfig) -> bool:
    final = run_dir / FINAL_FILE
    return final.exists() and json.loads(final.read_text())["steps"] >= stage.train.steps


def quiet_cpu_mode() -> None:
    """Before Megatron is imported: on a machine without CUDA, silence the fallback warnings known to be harmless
    (parallel/cpu_warnings.py says why each is) and say the same thing once."""
    import torch

    if torch.cuda.is_available():
        return
    from megahybrid.parallel.cpu_warnings import CPU_MODE_LINE, silence_known_cpu_warnings

    silence_known_cpu_warnings()
    if is_rank0_process():
        print(f"[megahybrid] {CPU_MODE_LINE}", file=sys.stderr, flush=True)


def _train_this_rank(cfg: RunConfig, *, print_final: bool) -> int:
    quiet_cpu_mode()
    from megahybrid.parallel.init import init_distributed
    from megahybrid.training.run_dir import write_resolved_config
    from megahybrid.training.signals import PreemptionHandler
    from megahybrid.training.trainer import Trainer

    start = time.time()
    ps = init_distributed(cfg)
    run_dir = Path(cfg.train.run_dir)
    try:
        if ps.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_resolved_config(run_dir, cfg)
        tokenizer = prepare_tokenizer(cfg, run_dir, ps)
        train_set, eval_set = prepare_data(cfg, tokenizer)
        with PreemptionHandler() as preemption:
            trainer = Trainer(cfg, ps, run_dir=run_dir, tokenizer=tokenizer, train_set=train_set, eval_set=eval_set)
            try:
                last_eval = trainer.fit(preemption)
                if ps.rank == 0:
                    _write_final(run_dir, trainer, last_eval, preempted=preemption.requested)
            finally:
                trainer.close()
    finally:
        ps.destroy()
    if ps.rank == 0 and print_final:
        print_final_line(run_dir, start)
    return 0


def prepare_tokenizer(cfg: RunConfig, run_dir: Path, ps: Any):
    """The model's tokenizer; for random-init tiny models a character tokenizer built into the run directory."""
    import torch.distributed as dist

    builds = not (cfg.model.tokenizer or cfg.model.hf_path)
    if builds and ps.rank == 0:
        load_tokenizer(cfg, run_dir)  # builds run_dir/tokenizer once, before the other ranks read it
    if builds and ps.world_size > 1:
        dist.barrier()
    return load_tokenizer(cfg, run_dir)


def load_tokenizer(cfg: RunConfig, build_dir: Path):
    """`model.tokenizer` / `model.hf_path`, or a character tokenizer built at `build_dir/tokenizer` (if absent)."""
    from megahybrid.config.loader import ConfigError
    from transformers import AutoTokenizer

    path = cfg.model.tokenizer or cfg.model.hf_path
    if path is None:
        path = str(build_dir / "tokenizer")
        if not (Path(path) / "tokenizer.json").exists():
            from megahybrid.model.tiny import build_char_tokenizer

            build_char_tokenizer(path, alphabet=cfg.model.char_alphabet)
    tok = AutoTokenizer.from_pretrained(path)
    if len(tok) > cfg.model.vocab_size:
        raise ConfigError([f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer at {path} "
                           f"({len(tok)} tokens); set model.vocab_size >= {len(tok)}"])
    return tok


def prepare_data(cfg: RunConfig, tokenizer: Any) -> tuple[list, list]:
    from megahybrid.data import load_dataset
    from megahybrid.data.tokenize import filter_by_length

    from megahybrid.algorithms.registry import get_algorithm

    def load(split: str) -> list:
        examples = load_dataset(cfg.data, split, seed=cfg.train.seed)
        if split == "train":
            examples = get_algorithm(cfg.algorithm.name).transform_examples(examples, cfg.algorithm)
        kept, _ = filter_by_length(examples, tokenizer, template=cfg.data.template,
                                   max_prompt_tokens=cfg.data.max_prompt_tokens,
                                   max_demo_tokens=cfg.data.max_demo_tokens,
                                   overlong_prompts=cfg.data.overlong_prompts)
        return kept

    return load("train"), load("eval")[: cfg.data.num_eval]


def eval_status(cfg: RunConfig) -> str | None:
    """Why a run has no held-out evaluation (None when it has one): said instead of an accuracy of nan."""
    if cfg.data.num_eval == 0:
        return "no evaluation (data.num_eval: 0)"
    if cfg.data.eval is None and not cfg.data.train.startswith("builtin:"):
        return "no eval split (data.eval is not set)"
    return None


def _write_final(run_dir: Path, trainer: Any, last_eval: dict[str, float], *, preempted: bool) -> None:
    from megahybrid.training.plots import write_plots

    plots_dir = run_dir / "plots"
    if trainer.cfg.logging.plots:
        write_plots(run_dir, plots_dir)
    history = trainer.history.get("eval/accuracy", [])
    first = next((acc for step, acc in history if step == 0), float("nan"))
    # nothing evaluated in this process (resumed at or past train.steps): the newest recorded evaluation
    accuracy = last_eval.get("eval/accuracy", history[-1][1] if history else float("nan"))
    eval_step = history[-1][0] if history else None  # the step `accuracy` was measured at
    final = {"accuracy": accuracy, "step0_accuracy": first, "steps": trainer.step, "plots": str(plots_dir),
             "preempted": preempted, "eval": eval_status(trainer.cfg) or "ok", "eval_step": eval_step}
    atomic_write_text(run_dir / FINAL_FILE, json.dumps(final))


def final_line(final: dict[str, Any], *, wall_s: float) -> str:
    """The run's closing line, from its final.json."""
    tail = f"steps={final['steps']} wall={wall_s:.0f}s plots={final['plots']}"
    if final.get("eval", "ok") != "ok":
        return f"megahybrid: final eval: {final['eval']}; {tail}"
    if final.get("preempted"):  # no final evaluation ran: say whose accuracy this is
        at = f" at step {final['eval_step']}" if final.get("eval_step") is not None else ""
        return (f"megahybrid: pre-empted after step {final['steps']} (checkpoint saved; the same command resumes); "
                f"last eval accuracy={final['accuracy']:.3f}{at} (step 0: {final['step0_accuracy']:.3f}) " + tail)
    return (f"megahybrid: final eval accuracy={final['accuracy']:.3f} (step 0: {final['step0_accuracy']:.3f}) "
            + tail)


def print_final_line(run_dir: Path, start: float) -> None:
    final = json.loads((run_dir / FINAL_FILE).read_text())
    sys.stdout.flush()
    print(final_line(final, wall_s=time.time() - start), flush=True)
