"""`megahybrid eval CONFIG --checkpoint DIR | --model HF_DIR`: held-out avg@k / pass@k (the config's eval settings:
train.eval_n, eval_temperature, eval_max_new_tokens, data.num_eval) of a saved policy or of any Hugging Face
folder (the base model, an export, `builtin:NAME`).

A Megatron checkpoint is first exported (training/export.py) to a temporary HF folder, so both kinds are
evaluated by the same code: the rollout engines on that folder, exactly as during training.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from megahybrid.config.schema import RunConfig

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory / checkpoints folder (its newest complete checkpoint)."""
    from megahybrid.training.run_dir import CheckpointDirs

    if (path / "COMPLETE").exists():
        return path
    for root in (path / "checkpoints", path):
        latest = CheckpointDirs(root, keep=1 << 30).latest_complete() if root.is_dir() else None
        if latest is not None:
            return latest
    raise SystemExit(f"eval: no complete checkpoint at {path} (looked for COMPLETE in it, in {path}/checkpoints/*"
                     f" and {path}/*)")


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("model*.safetensors"))


def model_overrides(model: str) -> list[str]:
    """Dotted overrides that point the config at `model` (a folder or builtin:NAME); its own tokenizer wins when it
    has one (an export carries the run's)."""
    if model.startswith("builtin:"):
        return [f"model.hf_path={model}", "model.tokenizer=null"]
    folder = Path(model).resolve()
    if not is_hf_folder(folder):
        raise SystemExit(f"eval: --model {model}: not a Hugging Face folder (no config.json + model*.safetensors)")
    has_tokenizer = any((folder / name).is_file() for name in _TOKENIZER_FILES)
    return [f"model.hf_path={folder}", f"model.tokenizer={folder if has_tokenizer else 'null'}"]


def evaluate_hf(cfg: RunConfig) -> dict[str, float]:
    """Held-out metrics of the HF folder `cfg.model.hf_path` (already resolved by the config loader)."""
    from megahybrid.training.entry import load_tokenizer, prepare_data
    from megahybrid.training.generation import Generator

    tokenizer = load_tokenizer(cfg, Path(cfg.train.run_dir))
    _, eval_set = prepare_data(cfg, tokenizer)
    if not eval_set:
        raise SystemExit("eval: the config has no held-out split (data.eval) to evaluate on")
    generator = Generator(cfg, tokenizer, cfg.model.hf_path)
    try:
        tr = cfg.train
        return generator.evaluate(eval_set, n=tr.eval_n, temperature=tr.eval_temperature,
                                  max_new_tokens=tr.eval_max_new_tokens or cfg.rollout.max_new_tokens, seed=tr.seed)
    finally:
        generator.close()


def evaluate_checkpoint(cfg: RunConfig, checkpoint: Path) -> dict[str, float]:
    """Held-out metrics of a Megatron checkpoint (or a run dir's newest) of the run `cfg`."""
    from megahybrid.training.export import export_checkpoint, find_run_dir

    ckpt = resolve_checkpoint(checkpoint)
    run_dir = find_run_dir(ckpt) or Path(cfg.train.run_dir)
    with tempfile.TemporaryDirectory(prefix="megahybrid-eval-") as tmp:
        folder = str(export_checkpoint(cfg, ckpt, Path(tmp) / "hf", run_dir=run_dir))
        # the export's config.json is cfg.model's effective config and it carries the run's tokenizer
        metrics = evaluate_hf(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_path=folder,
                                                                                 tokenizer=folder)))
    metrics["eval/checkpoint_step"] = float(int(ckpt.name.split("_")[-1])) if ckpt.name.startswith("step_") else -1.0
    return metrics


def run_eval(config: str, overrides: list[str], *, checkpoint: str | None, model: str | None) -> int:
    """CLI entry: exactly one of `checkpoint` (a Megatron checkpoint or run dir; an HF folder is detected) and
    `model` (an HF folder or builtin:NAME). Prints one `key=value` line per metric."""
    from megahybrid.config.loader import load_config

    if (checkpoint is None) == (model is None):
        raise SystemExit("eval: give exactly one of --checkpoint DIR and --model HF_DIR")
    if checkpoint is not None and is_hf_folder(Path(checkpoint)):
        model, checkpoint = checkpoint, None
    if model is not None:
        metrics = evaluate_hf(load_config(config, [*overrides, *model_overrides(model)]))
        metrics["eval/checkpoint_step"] = -1.0
    else:
        metrics = evaluate_checkpoint(load_config(config, overrides), Path(checkpoint))
    for key in sorted(metrics):
        print(f"{key}={metrics[key]:.4f}")
    return 0
