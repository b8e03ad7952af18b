"""Worker of the Megatron policy tests, run under torchrun (or alone for world 1):

    megatron_worker.py <scenario> <out.pt> <args...>

Scenarios run several TP/PP layouts in one launch (the process group is kept, Megatron's groups are rebuilt),
and rank 0 writes the measurements to <out.pt>; the pytest side compares them with independent references.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from megatron_cases import eval_tokens, make_loss_fn, micro_batches  # noqa: E402

from megahybrid.config.schema import RunConfig  # noqa: E402
from megahybrid.model import convert  # noqa: E402
from megahybrid.model.provider import build_policy  # noqa: E402
from megahybrid.parallel.init import init_distributed  # noqa: E402


def parse_layout(text: str) -> dict:
    """'tp,pp[,vpp][,dopt][,rc][,skew]' -> fields (rc = full activation recomputation, skew = data-parallel
    rank 0 gets every micro-batch and the others none)."""
    parts = text.split(",")
    vpp = int(parts[2]) if len(parts) > 2 and parts[2] not in ("", "-") else None
    return dict(tp=int(parts[0]), pp=int(parts[1]), vpp=vpp, dopt="dopt" in parts, recompute="rc" in parts,
                skew="skew" in parts)


def make_cfg(hf_dir: str | None, layout: dict) -> RunConfig:
    """hf_dir None = the seeded random init of a tiny Qwen2 described by the config alone."""
    cfg = RunConfig()
    cfg.model.hf_path = hf_dir
    if hf_dir is None:
        cfg.model.family, cfg.model.vocab_size, cfg.model.num_layers, cfg.model.tie_word_embeddings = \
            "qwen2", 61, 4, False
        cfg.model.hidden_size, cfg.model.num_attention_heads, cfg.model.head_dim = 64, 4, 16
    cfg.parallel.tensor_model_parallel_size = layout["tp"]
    cfg.parallel.pipeline_model_parallel_size = layout["pp"]
    cfg.parallel.virtual_pipeline_model_parallel_size = layout["vpp"]
    cfg.parallel.use_distributed_optimizer = layout["dopt"]
    cfg.model.recompute_activations = layout.get("recompute", False)
    cfg.optim.lr = 1e-2
    cfg.optim.clip_grad = 0.0
    cfg.train.steps = 10
    return cfg


def gather_to_rank0(obj):
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def hf_named_grads(policy) -> dict[str, torch.Tensor]:
    """Megatron main grads in HF names (TP-gathered), merged over pipeline stages; `sigma` from the last stage."""
    ps, m = policy.ps, policy.model_config
    tp = convert.TPInfo(ps.tp_rank, ps.tp_size, ps.tp_group)
    local: dict[str, torch.Tensor] = {}
    for module in policy.modules:
        for name, param, mapping in convert.iter_param_maps(module, m, policy.head.padded_vocab_size):
            if name == "output_layer.weight" and m.tie_word_embeddings:
                continue
            local.update(mapping.to_hf(param.main_grad.detach().float(), m, tp))
    if ps.is_last_stage and policy.extra_parameters:
        local["sigma"] = policy.extra_parameters[0].main_grad.detach().clone()
    merged: dict[str, torch.Tensor] = {}
    for part in gather_to_rank0(local):
        merged.update(part)
    return merged


def scenario_parity(out: str, llama_dir: str, qwen_dir: str, export_dir: str) -> None:
    tokens = eval_tokens()
    results = {}
    layouts = ["1,1", "2,1", "1,2", "2,2", "1,2,2"]
    for family, hf_dir in (("llama", llama_dir), ("qwen2", qwen_dir)):
        for text in layouts:
            layout = parse_layout(text)
            ps = init_distributed(make_cfg(hf_dir, layout))
            policy = build_policy(make_cfg(hf_dir, layout), ps, trainable=False)
            logits = policy.logits(tokens)
            logp, entropy = policy.logp_entropy(tokens, micro_batch_size=2)
            results[(family, text)] = gather_to_rank0((logits, logp, entropy))
            if text == "2,2":
                policy.export_hf(f"{export_dir}/{family}")
            ps.destroy(keep_process_group=True)
    for text in ("1,1", "2,2"):  # random init: the same model at every layout, exportable to HF
        layout = parse_layout(text)
        ps = init_distributed(make_cfg(None, layout))
        policy = build_policy(make_cfg(None, layout), ps, trainable=False)
        results[("random", text)] = gather_to_rank0((policy.logits(tokens),))
        if text == "2,2":
            policy.export_hf(f"{export_dir}/random")
        ps.destroy(keep_process_group=True)
    if dist.get_rank() == 0:
        torch.save(results, out)


def _models(arg: str) -> dict[str, str]:
    """'llama=/dir1;qwen2=/dir2' -> {family: HF folder}."""
    return dict(item.split("=", 1) for item in arg.split(";"))


def scenario_train(out: str, models: str, *specs: str) -> None:
    """specs: 'family@tp,pp[,vpp][,dopt]'. Two optimizer steps over the same 4 micro-batches (split over DP)."""
    results = {}
    mbs = micro_batches()
    num_tokens = sum(float(mb.mask.sum()) for mb in mbs)
    for spec in specs:
        family, text = spec.split("@")
        layout = parse_layout(text)
        cfg = make_cfg(_models(models)[family], layout)
        ps = init_distributed(cfg)
        sigma = torch.nn.Parameter(torch.tensor([0.3]))
        policy = build_policy(cfg, ps, extra_parameters=[sigma])
        mine = (mbs if ps.dp_rank == 0 else []) if layout["skew"] else mbs[ps.dp_rank::ps.dp_size]
        first = policy.train_step(mine, make_loss_fn(sigma, num_tokens))
        grads = None if layout["dopt"] else hf_named_grads(policy)
        second = policy.train_step(mine, make_loss_fn(sigma, num_tokens))
        results[spec] = dict(first=first, second=second, grads=grads, sigmas=gather_to_rank0(float(sigma)))
        ps.destroy(keep_process_group=True)
    if dist.get_rank() == 0:
        torch.save(results, out)


def scenario_ckpt(out: str, models: str, ckpt_root: str, *cases: str) -> None:
    """cases: 'family[,dopt]'. Save at TP2 after step 1 (the uninterrupted run continues); PP2 and TP1 (x DP2)
    load the checkpoint and continue with the same data."""
    mbs = micro_batches()
    num_tokens = sum(float(mb.mask.sum()) for mb in mbs)
    results = {}
    for case in cases:
        family, *opts = case.split(",")
        ckpt_dir = f"{ckpt_root}/{case.replace(',', '_')}"
        for text, load in (("2,1", False), ("1,2", True), ("1,1", True)):
            layout = parse_layout(text + (",-,dopt" if "dopt" in opts else ""))
            cfg = make_cfg(_models(models)[family], layout)
            cfg.optim.clip_grad, cfg.optim.warmup_steps, cfg.optim.schedule = 0.05, 1, "cosine"
            ps = init_distributed(cfg)
            sigma = torch.nn.Parameter(torch.tensor([0.3]))
            policy = build_policy(cfg, ps, extra_parameters=[sigma])
            mine = mbs[ps.dp_rank::ps.dp_size]
            steps, extra = [], None
            if load:
                extra = policy.load(ckpt_dir)
            else:
                steps.append(policy.train_step(mine, make_loss_fn(sigma, num_tokens)))
                policy.save(ckpt_dir, {"step": 1, "data_position": [3, 4], "numpy_rng": np.random.get_state()})
            for _ in range(2):
                steps.append(policy.train_step(mine, make_loss_fn(sigma, num_tokens)))
            results[(case, text)] = dict(steps=steps, extra=extra, sigmas=gather_to_rank0(float(sigma)))
            ps.destroy(keep_process_group=True)
    if dist.get_rank() == 0:
        torch.save(results, out)


def scenario_real(out: str, hf_dir: str, tokens_path: str, export_dir: str, *layouts: str) -> None:
    tokens = torch.load(tokens_path)
    results = {}
    for text in layouts:
        layout = parse_layout(text)
        cfg = make_cfg(hf_dir, layout)
        ps = init_distributed(cfg)
        policy = build_policy(cfg, ps, trainable=False)
        logp, _ = policy.logp_entropy(tokens, micro_batch_size=2)
        results[text] = gather_to_rank0(logp)
        if (layout["tp"], layout["pp"]) != (1, 1):  # the resharding layouts
            policy.export_hf(f"{export_dir}/{text.replace(',', '_')}")
        del policy
        ps.destroy(keep_process_group=True)
    if dist.get_rank() == 0:
        torch.save(results, out)


def scenario_gpu(out: str, hf_dir: str, ckpt_dir: str) -> None:
    """NCCL + Transformer Engine layer spec on one GPU: logits, a train step, and a checkpoint round trip."""
    tokens = eval_tokens()
    mbs = micro_batches()
    num_tokens = sum(float(mb.mask.sum()) for mb in mbs)
    cfg = make_cfg(hf_dir, parse_layout("1,1"))
    ps = init_distributed(cfg)
    assert ps.backend == "nccl" and ps.device.type == "cuda", (ps.backend, ps.device)
    sigma = torch.nn.Parameter(torch.tensor([0.3]))
    policy = build_policy(cfg, ps, extra_parameters=[sigma])
    logits = policy.logits(tokens)
    logp, entropy = policy.logp_entropy(tokens, micro_batch_size=2)
    first = policy.train_step(mbs, make_loss_fn(sigma, num_tokens))
    policy.save(ckpt_dir, {"step": 1})
    second = policy.train_step(mbs, make_loss_fn(sigma, num_tokens))
    extra = policy.load(ckpt_dir)
    again = policy.train_step(mbs, make_loss_fn(sigma, num_tokens))
    torch.save(dict(logits=logits, logp=logp, entropy=entropy, first=first, second=second, again=again,
                    extra=extra), out)


SCENARIOS = {"parity": scenario_parity, "train": scenario_train, "ckpt": scenario_ckpt, "real": scenario_real,
             "gpu": scenario_gpu}

if __name__ == "__main__":  # the guard matters: dist_checkpointing spawns writer processes
    scenario, out, *rest = sys.argv[1:]
    SCENARIOS[scenario](out, *rest)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
