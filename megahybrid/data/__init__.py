"""Data: typed records, JSONL/Parquet loaders, templates, token masks, SRL steps and the bundled tasks.

`load_dataset(cfg.data, split)` is the entry point: `builtin:<task>` or a file path.
"""
from __future__ import annotations

from megahybrid.config.schema import DataConfig
from megahybrid.data.records import DataError, Example, LoadStats

BUILTIN_TASKS = ("arith", "arith_steps", "champ")
"""Builtin tasks generated in memory. reasoning-gym's knights_knaves / gsm_symbolic are written to JSONL files
instead (`megahybrid data make TASK --out FILE`), so that train and eval files are fixed and inspectable."""


def _builtin(task: str, cfg: DataConfig, split: str, seed: int) -> list[Example]:
    num = cfg.num_train if split == "train" else cfg.num_eval
    if task in ("arith", "arith_steps"):
        from megahybrid.data.arith import generate_arith

        style = "steps" if task == "arith_steps" else cfg.demo_style
        return generate_arith(num, difficulty=cfg.difficulty, split=split, seed=seed, demo_style=style,
                              source=f"builtin:{task}")
    if task == "champ":
        from megahybrid.data.champ import load_champ

        return load_champ(split)[:num]
    raise ValueError(f"data: unknown builtin task {task!r}; available: {', '.join(BUILTIN_TASKS)} "
                     "(knights_knaves / gsm_symbolic: write a file with `megahybrid data make TASK --out FILE.jsonl`)")


def load_dataset(cfg: DataConfig, split: str = "train", *, seed: int = 0,
                 stats: LoadStats | None = None) -> list[Example]:
    """Examples of `split` ('train' or 'eval') from `cfg.train` / `cfg.eval`.

    `eval` with `cfg.eval=None` is the builtin task's held-out split (disjoint from train), or [] when training
    data is a file. Bad file rows raise `DataError` (file:line:field) unless `cfg.skip_bad_rows`, in which case
    they are counted in `stats`.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split: expected 'train' or 'eval', got {split!r}")
    spec = cfg.train if split == "train" else cfg.eval
    if spec is None:
        if not cfg.train.startswith("builtin:"):
            return []
        spec = cfg.train
    if spec.startswith("builtin:"):
        return _builtin(spec.split(":", 1)[1], cfg, split, seed)
    import os

    from megahybrid.data.loaders import load_file

    if not os.path.exists(spec):
        raise DataError(spec, None, None, f"file not found (from data.{split})")
    return load_file(spec, cfg.format, skip_bad_rows=cfg.skip_bad_rows, stats=stats)


__all__ = ["DataError", "Example", "LoadStats", "load_dataset", "BUILTIN_TASKS"]
