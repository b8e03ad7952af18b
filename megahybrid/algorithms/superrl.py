"""`superrl` (SPEC.md 4.4, SuperRL section 3): per-prompt fallback from RL to SFT, or an uncertainty-weighted mix.

Gate modes (`gate: reward | advantage`), computed after rewards from the rollouts only (never the demos):
`c = 1[max_k R_k > 0]` or `c = 1[max_k A_k > 0]`. Prompt loss `(1 - c) L_sft(its demos) + c L_pg(its rollouts)`,
each branch aggregated with `loss_agg` over that prompt's own tokens; batch loss = mean over the prompts that
contribute, counted globally. A prompt with c = 0 and no demo tokens contributes nothing (`superrl/no_signal`).
The per-prompt normalisers are per-sequence token weights (`fields['superrl/weight']`), so a prompt's sequences
may be spread over several micro-batches.

`gate: uncertainty` (SuperRL Eq. 2): `L = exp(-2 s_pg) L_pg + exp(-2 s_sft) L_sft + s_pg + s_sft` with both
losses over the whole batch and learnable scalars `s_pg`, `s_sft` (init 0; `parameters()`, `state_dict()`). The
constant `s_pg + s_sft` is spread over micro-batches in proportion to their counts of sequences with tokens, so the shares still
sum to L. Convention: a branch with no tokens in the global batch (e.g. no demos this step) also drops its `s`
term, so its log-sigma gets no gradient instead of drifting to -inf. The caller must all-reduce (SUM) the log-sigma gradients over data-parallel ranks, like any gradient.

Metrics (loss parts before the log-sigma weighting; `loss/pg` is the surrogate part, KL and entropy bonus are
`loss/kl` / `loss/entropy`): shares `loss/pg`, `loss/sft`, `loss/kl`, `actor/kl` (kl_coef > 0), `loss/entropy` (entropy_coef != 0),
`actor/clip_frac`, `entropy/demo`, `entropy/rollout`, `entropy/rollout_pos`, `entropy/rollout_neg`; final
`superrl/sft_frac` (prompts routed to SFT that have a demo / B; uncertainty: prompts with a demo / B), gate modes
`superrl/pg_frac`, `superrl/no_signal` (count), `superrl/no_signal_frac`, uncertainty mode `superrl/s_pg`,
`superrl/s_sft`, `superrl/w_pg`, `superrl/w_sft` (= exp(-2 s)); `reward/mean`, `response_length/mean`,
`response_length/demo`, `batch/num_prompts`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from megahybrid.algorithms.advantages import dense_groups, group_advantages, group_any, per_group_sum
from megahybrid.algorithms.base import Algorithm, Batch, StepPlan
from megahybrid.algorithms.common import ADV, aggregate_pg, base_stats, batch_metrics, common_problems, \
    entropy_metrics, pg_token_loss, pg_token_parts, sft_token_loss, token_groups
from megahybrid.algorithms.grpo import ROLLOUT_GROUPS, with_fields
from megahybrid.algorithms.losses import STAT_DTYPE, aggregate, group_counts, masked, seq_has_tokens, \
    token_mean_share
from megahybrid.algorithms.registry import register_algorithm
from megahybrid.config.schema import AlgorithmConfig

PG, SFT, WEIGHT = "superrl/pg", "superrl/sft", "superrl/weight"
"""Batch.fields keys: [S] bool routed to the PG / SFT branch, [S] per-token weight of the sequence's tokens."""
LOG_SIGMAS = ("s_pg", "s_sft")


def branch_weights(resp: Tensor, chosen: Tensor, prompt_index: Tensor, mode: str) -> Tensor:
    """[S] per-token weight that makes `sum_tokens weight * l` the prompt's `mode` aggregate over its chosen
    sequences (0 for sequences not chosen). A sequence with no tokens is never chosen."""
    gid, _ = dense_groups(prompt_index)
    ntok = resp.sum(-1).to(torch.float64)
    chosen_f = chosen.to(torch.float64)
    if mode == "token_mean":
        w = 1.0 / per_group_sum(ntok * chosen_f, prompt_index).clamp(min=1)[gid]
    else:
        w = 1.0 / per_group_sum(chosen_f, prompt_index).clamp(min=1)[gid]
        if mode == "seq_mean_token_mean":
            w = w / ntok.clamp(min=1)
    return torch.where(chosen, w, torch.zeros_like(w))


@register_algorithm("superrl")
class SuperRL(Algorithm):
    """Reward-gated (or advantage-gated) RL with SFT fallback; or the uncertainty-weighted hybrid."""

    @dataclass
    class Config(AlgorithmConfig):
        name: str = "superrl"
        """Registered algorithm name."""
        gate: Literal["reward", "advantage", "uncertainty"] = "reward"
        """Routing: c = 1[max R > 0] (reward), c = 1[max A > 0] (advantage), or learnable log-sigma mix."""
        kl_coef: float = 0.001
        """Per-token KL-to-reference coefficient of the policy-gradient branch (SuperRL uses 0.001)."""

        def validate(self) -> list[str]:
            problems = common_problems(self)
            if self.loss_agg == "seq_mean_token_sum_norm" and self.gate != "uncertainty":
                problems.append("loss_agg: seq_mean_token_sum_norm is not supported by superrl's per-prompt gated "
                                "aggregation; use token_mean, seq_mean_token_mean or seq_mean_token_sum")
            return problems

    needs_demos = True
    needs_rollouts = True

    def __init__(self, cfg: AlgorithmConfig, *, seed: int = 0, total_steps: int = 1, **kwargs):
        super().__init__(cfg, seed=seed, total_steps=total_steps, **kwargs)
        self.log_sigmas: dict[str, torch.nn.Parameter] = {}
        if cfg.gate == "uncertainty":
            self.log_sigmas = {k: torch.nn.Parameter(torch.zeros((), dtype=torch.float32)) for k in LOG_SIGMAS}

    # ------------------------------------------------------------------------------------------ state
    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.log_sigmas[k] for k in LOG_SIGMAS] if self.log_sigmas else []

    def state_dict(self) -> dict[str, Any]:
        return {k: p.detach().clone() for k, p in self.log_sigmas.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.log_sigmas):
            raise ValueError(f"superrl (gate={self.cfg.gate}) state keys {sorted(state)} != expected "
                             f"{sorted(self.log_sigmas)}")
        with torch.no_grad():  # in place: the optimizer keeps referencing the same Parameter objects
            for k, p in self.log_sigmas.items():
                p.copy_(torch.as_tensor(state[k]))

    # ------------------------------------------------------------------------------------------ prepare
    def prepare(self, batch: Batch, plan: StepPlan) -> tuple[Batch, dict[str, Tensor]]:
        rollout = ~batch.is_demo
        adv = group_advantages(batch.rewards, batch.prompt_index, rollout, self.cfg.norm_adv_by_std,
                               self.cfg.adv_eps)
        batch = with_fields(batch, **{ADV: adv})
        stats = base_stats(batch)
        has_tok = batch.response_mask.any(-1)
        demo_g = per_group_sum((batch.is_demo & has_tok).to(STAT_DTYPE), batch.prompt_index) > 0
        if self.cfg.gate == "uncertainty":
            stats["superrl/num_sft"] = demo_g.sum().to(STAT_DTYPE)
            stats.update(group_counts("response", batch.response_mask))
            return batch, stats
        signal = batch.rewards > 0 if self.cfg.gate == "reward" else adv > 0
        c = group_any(rollout & signal, batch.prompt_index)
        pg, sft = rollout & c & has_tok, batch.is_demo & ~c & has_tok
        weight = branch_weights(batch.response_mask, pg | sft, batch.prompt_index, self.cfg.loss_agg)
        batch = with_fields(batch, **{PG: pg, SFT: sft, WEIGHT: weight})
        c_g = per_group_sum((rollout & signal).to(STAT_DTYPE), batch.prompt_index) > 0
        contrib_g = per_group_sum((pg | sft).to(STAT_DTYPE), batch.prompt_index) > 0
        stats.update(group_counts("pg", batch.response_mask & pg[:, None]))
        stats.update({"superrl/num_contrib": contrib_g.sum().to(STAT_DTYPE),
                      "superrl/num_sft": (~c_g & demo_g).sum().to(STAT_DTYPE),
                      "superrl/num_pg": (c_g & contrib_g).sum().to(STAT_DTYPE),
                      "superrl/num_no_signal": (~c_g & ~demo_g).sum().to(STAT_DTYPE)})
        return batch, stats

    def metrics_from_stats(self, stats: dict[str, Tensor]) -> dict[str, float]:
        out = batch_metrics(stats)
        num_prompts = max(float(stats["num_prompts"]), 1.0)
        out["superrl/sft_frac"] = float(stats["superrl/num_sft"]) / num_prompts
        if self.log_sigmas:
            for k, p in self.log_sigmas.items():
                out[f"superrl/{k}"] = float(p.detach())
                out[f"superrl/w_{k[2:]}"] = math.exp(-2.0 * float(p.detach()))
        else:
            out["superrl/pg_frac"] = float(stats["superrl/num_pg"]) / num_prompts
            out["superrl/no_signal"] = float(stats["superrl/num_no_signal"])
            out["superrl/no_signal_frac"] = float(stats["superrl/num_no_signal"]) / num_prompts
        return out

    # ------------------------------------------------------------------------------------------ loss
    def loss(self, mb: Batch, logp: Tensor, entropy: Tensor, stats: dict[str, Tensor],
             plan: StepPlan) -> tuple[Tensor, dict[str, Tensor]]:
        if self.log_sigmas:
            loss, metrics = self._uncertainty_loss(mb, logp, entropy, stats)
        else:
            loss, metrics = self._gated_loss(mb, logp, entropy, stats)
        metrics.update(entropy_metrics(mb, entropy, stats, ("demo", *ROLLOUT_GROUPS)))
        return loss, metrics

    def _gated_loss(self, mb, logp, entropy, stats) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, resp = self.cfg, mb.response_mask
        pg_mask, sft_mask = resp & mb.fields[PG][:, None], resp & mb.fields[SFT][:, None]
        weight = mb.fields[WEIGHT].to(logp.dtype)[:, None]
        num_contrib = stats["superrl/num_contrib"].to(logp.dtype).clamp(min=1)
        parts = pg_token_parts(cfg, mb, logp, entropy, pg_mask, mb.fields[ADV], cfg.kl_coef)

        def prompt_mean(per_token: Tensor, mask: Tensor) -> Tensor:
            return (masked(per_token, mask) * weight).sum() / num_contrib

        pg = prompt_mean(pg_token_loss(parts, cfg.kl_coef, cfg.entropy_coef), pg_mask)
        sft = prompt_mean(sft_token_loss(mb, logp, sft_mask, cfg.sft_weight), sft_mask)
        metrics = {"loss/pg": prompt_mean(parts["surrogate"], pg_mask).detach(), "loss/sft": sft.detach(),
                   "actor/clip_frac": token_mean_share(parts["clipped"].to(logp.dtype), pg_mask, stats, "pg")}
        if "kl" in parts:
            metrics["loss/kl"] = prompt_mean(cfg.kl_coef * parts["kl"], pg_mask).detach()
            metrics["actor/kl"] = token_mean_share(parts["kl"], pg_mask, stats, "pg")
        if cfg.entropy_coef:
            metrics["loss/entropy"] = prompt_mean(-cfg.entropy_coef * parts["entropy"], pg_mask).detach()
        return pg + sft, metrics

    def _uncertainty_loss(self, mb, logp, entropy, stats) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, groups = self.cfg, token_groups(mb)
        parts = pg_token_parts(cfg, mb, logp, entropy, groups["rollout"], mb.fields[ADV], cfg.kl_coef)
        pg, metrics = aggregate_pg(cfg, parts, groups["rollout"], stats, "rollout", cfg.kl_coef)
        sft = aggregate(sft_token_loss(mb, logp, groups["demo"], cfg.sft_weight), groups["demo"], cfg.loss_agg,
                        stats, "demo")
        s_pg, s_sft = (self.log_sigmas[k].to(device=logp.device, dtype=logp.dtype) for k in LOG_SIGMAS)
        # The regulariser s_pg + s_sft appears once in L: each micro-batch carries its share of the sequences
        # that have response tokens (so the trainer's padding rows, which have none, carry nothing).
        # A branch without any token in the global batch drops its s term too, else its s would drift to -inf
        # (and a batch without tokens must have loss 0 and zero gradient, SPEC 9).
        share = seq_has_tokens(mb.response_mask).sum().to(logp.dtype) / \
            stats["num_seqs/response"].to(logp.dtype).clamp(min=1)
        reg = s_pg * float(stats["num_tokens/rollout"] > 0) + s_sft * float(stats["num_tokens/demo"] > 0)
        loss = torch.exp(-2 * s_pg) * pg + torch.exp(-2 * s_sft) * sft + reg * share
        metrics["loss/sft"] = sft.detach()
        return loss, metrics
