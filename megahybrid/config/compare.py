"""Method-comparison files: one shared run config plus a partial config per method.

    base_config: srft_arith.yaml        # a run config (path relative to this file)
    out_dir: runs/compare_arith         # each method runs in <out_dir>/<method>
    overrides: [train.steps=100]        # applied to every method (optional)
    methods:
      sft:  {algorithm: {name: sft}}
      srl:  {algorithm: {name: srl}, data: {train: "builtin:arith_steps"}, reward: {name: srl_similarity}}

Every method gets the same budget (steps, prompts, seed) unless its partial config says otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megahybrid.config.loader import (ConfigError, apply_overrides, deep_merge, from_dict, load_raw, read_yaml)
from megahybrid.config.schema import RunConfig
from megahybrid.config.validate import validate_config

COMPARE_KEYS = {"base_config", "out_dir", "overrides", "methods"}


@dataclass
class CompareSpec:
    out_dir: Path
    runs: dict[str, RunConfig]
    """Method label -> its fully resolved run config (train.run_dir = out_dir/label)."""
    raw: dict[str, dict]
    """Method label -> the merged raw dict (what `megahybrid train` is given)."""


def is_compare_file(path: str | Path) -> bool:
    return "methods" in read_yaml(path)


def load_compare(path: str | Path, overrides: list[str] | None = None) -> CompareSpec:
    path = Path(path)
    data = read_yaml(path)
    unknown = set(data) - COMPARE_KEYS
    if unknown:
        raise ConfigError([f"{path}: {k}: unknown key in a comparison file; valid keys: "
                           f"{', '.join(sorted(COMPARE_KEYS))}" for k in sorted(unknown)])
    for key in ("base_config", "methods"):
        if key not in data:
            raise ConfigError([f"{path}: {key}: required in a comparison file"])
    methods = data["methods"]
    if not isinstance(methods, dict) or not methods:
        raise ConfigError([f"{path}: methods: expected a non-empty mapping of label -> partial config"])
    shared = data.get("overrides") or []
    if not isinstance(shared, list):
        raise ConfigError([f"{path}: overrides: expected a list of key=value strings"])
    out_dir = Path(data.get("out_dir", f"runs/{path.stem}"))
    base = load_raw(path.parent / data["base_config"])
    runs, raws, problems = {}, {}, []
    for label, partial in methods.items():
        if not isinstance(partial, dict):
            problems.append(f"{path}: methods.{label}: expected a mapping (partial run config)")
            continue
        raw = apply_overrides(deep_merge(base, partial), [*shared, *(overrides or []),
                                                           f"train.run_dir={out_dir / label}"])
        try:
            cfg = from_dict(raw, f"{path} [methods.{label}]")
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        problems.extend(f"{path} [methods.{label}]: {p}" for p in validate_config(cfg))
        runs[label], raws[label] = cfg, raw
    if problems:
        raise ConfigError(problems)
    return CompareSpec(out_dir=out_dir, runs=runs, raw=raws)
