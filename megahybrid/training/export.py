"""`megahybrid export CHECKPOINT_OR_RUN_DIR --out DIR`: a training checkpoint (any TP/PP layout) as a Hugging Face
folder: safetensors, the effective config.json, the tokenizer and a generation_config.json.

The checkpoint is loaded in one process at TP=PP=DP=1 (dist_checkpointing reshards whatever layout it was saved
at) and written by the same `export_hf` that feeds the rollout engines, so an export and the engines' weights
cannot drift apart. The folder appears whole or not at all: everything is written into a hidden sibling
`.<name>.export-<pid>` and renamed into place at the end.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from megahybrid.config.schema import RunConfig

RUN_CONFIG = "config.yaml"  # run_dir.write_resolved_config
_STAGING_MARK = ".export-"


def single_process(cfg: RunConfig) -> RunConfig:
    """`cfg` laid out on one process: any saved TP/PP layout loads at TP=PP=DP=1."""
    return dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, data_parallel_size=None, world_size=1,
        use_distributed_optimizer=False, sequence_parallel=False))


def find_run_dir(ckpt: Path) -> Path | None:
    """The run directory holding `config.yaml` for checkpoint `ckpt` (run_dir/checkpoints/step_N, or a directory
    with its own config.yaml)."""
    for candidate in (ckpt, ckpt.parent, ckpt.parent.parent):
        if (candidate / RUN_CONFIG).is_file():
            return candidate
    return None


def load_run_config(ckpt: Path, config: str | None, overrides: list[str]) -> tuple[RunConfig, Path]:
    """The run's resolved config (or `config`) and the directory its relative parts (the built tokenizer) are in."""
    from megahybrid.config.loader import ConfigError, load_config

    run_dir = find_run_dir(ckpt)
    if config is None:
        if run_dir is None:
            raise ConfigError([f"export: no {RUN_CONFIG} next to {ckpt} (looked in it, its parent and the run "
                               f"directory above); pass --config CONFIG"])
        config = str(run_dir / RUN_CONFIG)
    cfg = load_config(config, overrides)
    return cfg, run_dir or Path(cfg.train.run_dir)


def generation_config(tokenizer: Any, source_dir: str | None) -> dict[str, Any]:
    """The source checkpoint's generation_config.json (when it has one) with the token ids the trainer used: the
    tokenizer's EOS ends every rollout and demo, so a generate() without it would run past the trained stop."""
    config: dict[str, Any] = {}
    src = Path(source_dir) / "generation_config.json" if source_dir else None
    if src is not None and src.is_file():
        config = json.loads(src.read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, key, None)
        if value is not None:
            config[key] = value
    config.setdefault("pad_token_id", config.get("eos_token_id"))
    return config


def _clean_stale_staging(out: Path) -> None:
    """Remove staging folders of earlier exports to `out` whose process is gone (killed mid-way)."""
    if not out.parent.is_dir():
        return
    prefix = f".{out.name}{_STAGING_MARK}"
    for path in out.parent.iterdir():
        if not path.name.startswith(prefix):
            continue
        pid = path.name[len(prefix):]
        try:
            os.kill(int(pid), 0)
            continue  # still running: another export
        except (ValueError, ProcessLookupError):
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            continue


def _publish(staging: Path, out: Path, force: bool) -> None:
    parked = None
    if out.exists():
        if not force:
            raise FileExistsError(f"export: {out} already exists (use --force to replace it)")
        parked = out.parent / f".{out.name}.replaced-{os.getpid()}"
        os.rename(out, parked)
    os.rename(staging, out)
    if parked is not None:
        shutil.rmtree(parked, ignore_errors=True)


def export_checkpoint(cfg: RunConfig, ckpt: Path, out: Path, *, run_dir: Path, force: bool = False,
                      max_shard_bytes: int = 2 << 30) -> Path:
    """Write checkpoint `ckpt` of the run `cfg` as an HF folder at `out` (atomically). Returns `out`."""
    out = out.resolve()
    if out.exists() and not force:  # before the slow part
        raise FileExistsError(f"export: {out} already exists (use --force to replace it)")
    from megahybrid.training.entry import quiet_cpu_mode

    quiet_cpu_mode()  # before Megatron is imported
    from megahybrid.model.provider import build_policy
    from megahybrid.parallel.init import init_distributed
    from megahybrid.training.entry import load_tokenizer
    from megahybrid.training.policy_checkpoint import export_hf

    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_staging(out)
    cfg = single_process(cfg)
    tokenizer = load_tokenizer(cfg, run_dir)
    staging = out.parent / f".{out.name}{_STAGING_MARK}{os.getpid()}"
    ps = init_distributed(cfg)
    try:
        policy = build_policy(cfg, ps, trainable=False)
        policy.load(str(ckpt))
        export_hf(policy, str(staging), tokenizer_dir=tokenizer.name_or_path, max_shard_bytes=max_shard_bytes)
        gen = generation_config(tokenizer, policy.model_config.hf_path)
        (staging / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _publish(staging, out, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        ps.destroy()
    return out


def run_export(path: str, out: str, *, config: str | None = None, overrides: list[str] | None = None,
               force: bool = False) -> int:
    from megahybrid.training.evaluate_checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(Path(path))
    cfg, run_dir = load_run_config(ckpt, config, overrides or [])
    try:
        written = export_checkpoint(cfg, ckpt, Path(out), run_dir=run_dir, force=force)
    except FileExistsError as exc:
        print(f"megahybrid {exc}", file=sys.stderr)
        return 2
    print(f"megahybrid export: {ckpt} -> {written}")
    return 0
