"""`hpt` (SPEC 10.C 4.11, Hybrid Post-Training arXiv 2509.04419): per-prompt switch between SFT and GRPO by the
rollouts' success count.

`c = #{k : R_k > 0}` over the prompt's `rollout.n` rollouts (0/1 reward: R = 1 is correct, SPEC 10.E). If
`c <= gate` and the prompt has a demo, it is an SFT prompt: its rollouts are dropped and its first demo is trained
with the (sft_weight-weighted) NLL; otherwise a GRPO prompt with its rollouts ([ours]: a prompt without a demo stays
a GRPO prompt). The loss is

    L = sft_coef * token_mean(NLL over the demo tokens of SFT prompts) + agg(PG loss over GRPO prompts' rollouts)

with advantages from each GRPO prompt's own rollouts and `loss_agg` (recipe: seq_mean_token_sum_norm, no clip,
mean-only advantages, entropy 0.001 over the GRPO tokens). With gate 0 the routing equals superrl's reward gate.

Metrics: shares `hpt/sft_loss` (before sft_coef), `hpt/pg_loss` (the PG part incl. its entropy term), `loss/pg`,
`loss/entropy`, `actor/clip_frac`, `entropy/*`; final `hpt/sft_frac` (SFT prompts / B), `reward/mean`, lengths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megahybrid.algorithms.advantages import dense_groups, group_advantages, per_group_sum
from megahybrid.algorithms.base import Algorithm, Batch, StepPlan
from megahybrid.algorithms.common import ADV, DrGRPOConfig, aggregate_pg, base_stats, batch_metrics, \
    common_problems, entropy_metrics, pg_token_parts, sft_token_loss
from megahybrid.algorithms.grpo import with_fields
from megahybrid.algorithms.luffy import rank_in_group
from megahybrid.algorithms.losses import STAT_DTYPE, aggregate, group_counts
from megahybrid.algorithms.registry import register_algorithm

SFT_SEQ, PG_SEQ = "hpt/sft", "hpt/pg"
"""Batch.fields keys: [S] bool, the sequence is the trained demo of an SFT prompt / a rollout of a GRPO prompt."""


@register_algorithm("hpt")
class HPT(Algorithm):
    """Success-count switch between SFT (demo) and GRPO (rollouts), per prompt."""

    @dataclass
    class Config(DrGRPOConfig):
        """The code recipe's RL settings (DrGRPOConfig) for the PG part; the SFT part is a token mean."""

        name: str = "hpt"
        """Registered algorithm name."""
        gate: int = 0
        """A prompt with at most this many correct rollouts is trained on its demo (SWITCH_GATE; 2 for Llama)."""
        sft_coef: float = 1.0
        """Weight of the SFT part (SFT_LOSS_COEF; 0.3 for Qwen2.5-Math-1.5B)."""

        def validate(self) -> list[str]:
            problems = common_problems(self)
            if self.gate < 0:
                problems.append(f"gate: must be >= 0, got {self.gate}")
            if self.sft_coef < 0:
                problems.append(f"sft_coef: must be >= 0, got {self.sft_coef}")
            return problems

    needs_demos = True
    needs_rollouts = True

    def prepare(self, batch: Batch, plan: StepPlan) -> tuple[Batch, dict[str, Tensor]]:
        cfg, rollout = self.cfg, ~batch.is_demo
        gid, _ = dense_groups(batch.prompt_index)
        correct = per_group_sum((rollout & (batch.rewards > 0)).to(STAT_DTYPE), batch.prompt_index)
        first_demo = batch.is_demo & (rank_in_group(batch.prompt_index, batch.is_demo) == 0)
        has_demo = per_group_sum(first_demo.to(STAT_DTYPE), batch.prompt_index) > 0
        sft_prompt = (correct <= cfg.gate) & has_demo
        sft_seq, pg_seq = first_demo & sft_prompt[gid], rollout & ~sft_prompt[gid]
        adv = group_advantages(batch.rewards, batch.prompt_index, rollout, cfg.norm_adv_by_std, cfg.adv_eps)
        batch = with_fields(batch, **{ADV: adv, SFT_SEQ: sft_seq, PG_SEQ: pg_seq})
        stats = base_stats(batch)
        stats.update(group_counts("hpt_sft", batch.response_mask & sft_seq[:, None]))
        stats.update(group_counts("hpt_pg", batch.response_mask & pg_seq[:, None]))
        stats["hpt/num_sft"] = sft_prompt.sum().to(STAT_DTYPE)
        return batch, stats

    def metrics_from_stats(self, stats: dict[str, Tensor]) -> dict[str, float]:
        out = batch_metrics(stats)
        out["hpt/sft_frac"] = float(stats["hpt/num_sft"]) / max(float(stats["num_prompts"]), 1.0)
        return out

    def loss(self, mb: Batch, logp: Tensor, entropy: Tensor, stats: dict[str, Tensor],
             plan: StepPlan) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, resp = self.cfg, mb.response_mask
        sft_mask, pg_mask = resp & mb.fields[SFT_SEQ][:, None], resp & mb.fields[PG_SEQ][:, None]
        sft = aggregate(sft_token_loss(mb, logp, sft_mask, cfg.sft_weight), sft_mask, "token_mean", stats, "hpt_sft")
        parts = pg_token_parts(cfg, mb, logp, entropy, pg_mask, mb.fields[ADV], kl_coef=cfg.kl_coef)
        pg, metrics = aggregate_pg(cfg, parts, pg_mask, stats, "hpt_pg", cfg.kl_coef)
        metrics.update({"hpt/sft_loss": sft.detach(), "hpt/pg_loss": pg.detach()})
        metrics.update(entropy_metrics(mb, entropy, stats, ("demo", "rollout", "rollout_pos", "rollout_neg")))
        return cfg.sft_coef * sft + pg, metrics
