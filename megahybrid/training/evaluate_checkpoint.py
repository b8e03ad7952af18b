"""`megahybrid eval CONFIG --checkpoint DIR`: held-out avg@k / pass@k of a saved policy (one process)."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from megahybrid.config.schema import RunConfig


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


def evaluate_checkpoint(cfg: RunConfig, checkpoint: Path) -> dict[str, float]:
    from megahybrid.training.entry import quiet_cpu_mode

    quiet_cpu_mode()  # before Megatron is imported
    from megahybrid.model.provider import build_policy
    from megahybrid.parallel.init import init_distributed
    from megahybrid.training.entry import prepare_data, prepare_tokenizer
    from megahybrid.training.generation import Generator

    ckpt = resolve_checkpoint(checkpoint)
    # evaluation runs in one process: any saved TP/PP layout loads at TP=PP=DP=1 (dist_checkpointing reshards)
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, data_parallel_size=None, world_size=1,
        use_distributed_optimizer=False, sequence_parallel=False))
    ps = init_distributed(cfg)
    generator = None
    try:
        tokenizer = prepare_tokenizer(cfg, Path(cfg.train.run_dir), ps)
        _, eval_set = prepare_data(cfg, tokenizer)
        if not eval_set:
            raise SystemExit("eval: the config has no held-out split (data.eval) to evaluate on")
        policy = build_policy(cfg, ps, trainable=False)
        policy.load(str(ckpt))
        with tempfile.TemporaryDirectory(prefix="megahybrid-eval-") as tmp:
            policy.export_hf(tmp, tokenizer_dir=tokenizer.name_or_path)
            generator = Generator(cfg, tokenizer, tmp)
            tr = cfg.train
            metrics = generator.evaluate(eval_set, n=tr.eval_n, temperature=tr.eval_temperature,
                                         max_new_tokens=tr.eval_max_new_tokens or cfg.rollout.max_new_tokens,
                                         seed=tr.seed)
            generator.close()
            generator = None
    finally:
        if generator is not None:
            generator.close()
        ps.destroy()
    metrics["eval/checkpoint_step"] = float(int(ckpt.name.split("_")[-1])) if ckpt.name.startswith("step_") else -1.0
    return metrics
