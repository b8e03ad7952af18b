"""Random batches and a simulated (micro-batches x data-parallel ranks) driver for the algorithm tests.

`run_split` mimics the trainer: each simulated rank holds whole prompt groups and runs `prepare` on them, the
statistics are summed over ranks (the all-reduce), then each rank's batch is cut into micro-batches (cuts may split
a prompt's sequences) and the `loss` shares of all micro-batches on all ranks are summed.
"""
from __future__ import annotations

import torch

from megahybrid.algorithms import get_algorithm
from megahybrid.algorithms.base import Batch, StepPlan
from megahybrid.config.schema import RolloutConfig

L_MAX = 13
"""rollout.max_new_tokens of the algorithms under test (= algo_reference.L_MAX, stated independently there)."""

F64 = torch.float64


def make_batch(seed: int, num_prompts: int = 4, k: int = 3, demos=(1, 0, 2, 1), T: int = 9, rewards: str = "binary",
               empty_prob: float = 0.15, dtype=F64, min_response: int = 0):
    """A shuffled batch (prompt ids not dense, groups interleaved) plus leaf `logp`, `entropy` [S, T].

    rewards: binary (0/1), float (U(-0.5, 1.5)), equal (one value per prompt), nonpositive (0 or -1).
    Non-response positions of the constant tensors hold NaN: any leak of padding into a loss shows up.
    """
    g = torch.Generator().manual_seed(seed)
    rows = [(100 + 7 * i, False) for i in range(num_prompts) for _ in range(k)]
    rows += [(100 + 7 * i, True) for i in range(num_prompts) for _ in range(demos[i % len(demos)])]
    order = torch.randperm(len(rows), generator=g).tolist()
    rows = [rows[i] for i in order]
    S = len(rows)
    mask = torch.zeros(S, T, dtype=torch.bool)
    for s in range(S):
        start = int(torch.randint(1, 3, (), generator=g))
        length = int(torch.randint(min_response, T - start + 1, (), generator=g))
        if min_response == 0 and float(torch.rand((), generator=g)) < empty_prob:
            length = 0
        mask[s, start:start + length] = True
    prompt = torch.tensor([p for p, _ in rows])
    is_demo = torch.tensor([d for _, d in rows])
    per_prompt = {p: float(torch.randint(0, 2, (), generator=g)) for p, _ in rows}
    r = {"binary": lambda s: float(torch.randint(0, 2, (), generator=g)),
         "float": lambda s: float(torch.rand((), generator=g)) * 2 - 0.5,
         "equal": lambda s: per_prompt[rows[s][0]],
         "nonpositive": lambda s: -float(torch.randint(0, 2, (), generator=g))}[rewards]
    reward = torch.tensor([r(s) for s in range(S)], dtype=F64)

    def rnd(*shape):
        return torch.rand(*shape, generator=g, dtype=F64)

    logp = -(rnd(S, T) * 2.5 + 0.05)
    old = logp + 0.3 * torch.randn(S, T, generator=g, dtype=F64)
    ref = logp + 0.6 * torch.randn(S, T, generator=g, dtype=F64) + 3.5 * (rnd(S, T) < 0.1)  # some k3 > 10
    engine = old + 0.25 * torch.randn(S, T, generator=g, dtype=F64)
    old_h = rnd(S, T) * 3
    nan = torch.full((), float("nan"), dtype=F64)
    batch = Batch(tokens=torch.randint(0, 50, (S, T), generator=g), response_mask=mask, prompt_index=prompt,
                  is_demo=is_demo, rewards=reward, old_logp=torch.where(mask, old, nan),
                  old_entropy=torch.where(mask, old_h, nan), ref_logp=torch.where(mask, ref, nan),
                  engine_logp=torch.where(mask, engine, nan)).to(dtype)
    logp = logp.to(dtype).requires_grad_(True)
    entropy = (rnd(S, T) * 3).to(dtype).requires_grad_(True)
    return batch, logp, entropy


def make_algo(name: str, dtype=F64, seed: int = 0, total_steps: int = 100, rollout: dict | None = None,
              **overrides):
    """The algorithm with `overrides` of its Config and `rollout` keys of RolloutConfig (max_new_tokens = L_MAX)."""
    cls = get_algorithm(name)
    ro = RolloutConfig(**{"max_new_tokens": L_MAX, **(rollout or {})})
    algo = cls(cls.Config(**overrides), seed=seed, total_steps=total_steps, rollout=ro)
    for p in algo.parameters():
        p.data = p.data.to(dtype)
    return algo


def rank_indices(batch: Batch, ranks: int) -> list[torch.Tensor]:
    """Split the sequences into `ranks` sets of whole prompt groups."""
    prompts = []
    for p in batch.prompt_index.tolist():
        if p not in prompts:
            prompts.append(p)
    chunks = [prompts[i::ranks] for i in range(ranks)]
    return [torch.tensor([s for s, p in enumerate(batch.prompt_index.tolist()) if p in c], dtype=torch.long)
            for c in chunks]


def with_padding(mb: Batch, logp, entropy, num: int):
    """Append `num` rows like the trainer's micro-batch padding: no response tokens, prompt_index -1, zero
    constants and fields, arbitrary finite policy outputs. They must contribute nothing."""
    if num == 0:
        return mb, logp, entropy
    T = mb.tokens.shape[1]

    def zeros(t):
        return None if t is None else torch.zeros((num, *t.shape[1:]), dtype=t.dtype)

    pad = Batch(tokens=torch.zeros(num, T, dtype=torch.long), response_mask=torch.zeros(num, T, dtype=torch.bool),
                prompt_index=torch.full((num,), -1), is_demo=torch.zeros(num, dtype=torch.bool),
                rewards=torch.zeros(num, dtype=mb.rewards.dtype), old_logp=zeros(mb.old_logp),
                old_entropy=zeros(mb.old_entropy), ref_logp=zeros(mb.ref_logp), engine_logp=zeros(mb.engine_logp),
                fields={k: zeros(v) for k, v in mb.fields.items()})
    cat = {f: None if getattr(mb, f) is None else torch.cat([getattr(mb, f), getattr(pad, f)])
           for f in ("tokens", "response_mask", "prompt_index", "is_demo", "rewards", "old_logp", "old_entropy",
                     "ref_logp", "engine_logp")}
    padded = Batch(**cat, fields={k: torch.cat([v, pad.fields[k]]) for k, v in mb.fields.items()})
    garbage = torch.full((num, T), -1.5, dtype=logp.dtype)
    return padded, torch.cat([logp, garbage]), torch.cat([entropy, garbage.abs()])


def run_split(algo, batch: Batch, logp, entropy, plan: StepPlan | None = None, ranks: int = 1, micro: int = 1,
              pad: int = 0):
    """Total loss, summed metric shares, final metrics and the all-reduced statistics. `pad` padding rows are
    appended to every micro-batch (as the trainer does to give every micro-batch the same shape)."""
    plan = plan or algo.plan(0)
    prepared, local = [], []
    for idx in rank_indices(batch, ranks):
        b, st = algo.prepare_batch(batch.select(idx), plan)
        prepared.append((idx, b))
        local.append(st)
    stats = reduce_stats(local)
    total, shares = 0.0, {}
    for idx, b in prepared:
        for mb_idx in torch.tensor_split(torch.arange(b.num_sequences), micro):
            mb, mb_logp, mb_entropy = with_padding(b.select(mb_idx), logp[idx][mb_idx], entropy[idx][mb_idx], pad)
            loss, metrics = algo.loss(mb, mb_logp, mb_entropy, stats, plan)
            total = total + loss
            for key, value in metrics.items():
                shares[key] = shares.get(key, 0.0) + float(value)
    return total, shares, algo.final_metrics(stats), stats


def reduce_stats(local: list[dict]) -> dict:
    """The trainer's all-reduce: SUM, and MAX for `max/` keys."""
    return {k: (torch.stack([st[k] for st in local]).max(0).values if k.startswith("max/") else
                sum(st[k] for st in local)) for k in local[0]}


def grads(loss, inputs):
    """Gradients of `loss` w.r.t. `inputs` (zeros where unused, or for a constant loss)."""
    if not loss.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    out = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(out, inputs)]
