"""`grpo` (SPEC.md 4.2): clipped surrogate with group advantages over the K rollouts, optional KL and entropy
terms, optional dynamic sampling (`filter_groups`: keep a group only if its rewards are not all equal and their
std >= `min_std`; the trainer resamples up to `train.max_sample_rounds`).

Metrics: shares `loss/pg`, `loss/kl` (kl_coef > 0), `loss/entropy` (entropy_coef != 0), `actor/clip_frac`,
`actor/kl` (kl_coef > 0), `entropy/rollout`, `entropy/rollout_pos`, `entropy/rollout_neg`; final `reward/mean`,
`response_length/mean`, `batch/num_prompts`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from megahybrid.algorithms.advantages import group_advantages, keep_groups
from megahybrid.algorithms.base import Algorithm, Batch, StepPlan
from megahybrid.algorithms.common import ADV, aggregate_pg, base_stats, batch_metrics, common_problems, \
    entropy_metrics, pg_token_parts, token_groups
from megahybrid.algorithms.registry import register_algorithm
from megahybrid.config.schema import AlgorithmConfig

ROLLOUT_GROUPS = ("rollout", "rollout_pos", "rollout_neg")


def with_fields(batch: Batch, **fields: Tensor) -> Batch:
    """A copy of `batch` with extra per-sequence fields."""
    return dataclasses.replace(batch, fields={**batch.fields, **fields})


def grpo_prepare(cfg: AlgorithmConfig, batch: Batch) -> tuple[Batch, dict[str, Tensor]]:
    """Group advantages over each prompt's rollouts (demos never join) into `fields['adv']`; base statistics."""
    adv = group_advantages(batch.rewards, batch.prompt_index, ~batch.is_demo, cfg.norm_adv_by_std, cfg.adv_eps)
    return with_fields(batch, **{ADV: adv}), base_stats(batch)


def grpo_loss(cfg: AlgorithmConfig, mb: Batch, logp: Tensor, entropy: Tensor, stats: dict[str, Tensor],
              kl_coef: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Aggregated clipped-surrogate loss over the rollout tokens (+ KL with `kl_coef`, + entropy bonus)."""
    mask = token_groups(mb)["rollout"]
    parts = pg_token_parts(cfg, mb, logp, entropy, mask, mb.fields[ADV], kl_coef)
    loss, metrics = aggregate_pg(cfg, parts, mask, stats, "rollout", kl_coef)
    metrics.update(entropy_metrics(mb, entropy, stats, ROLLOUT_GROUPS))
    return loss, metrics


@register_algorithm("grpo")
class GRPO(Algorithm):
    """Group Relative Policy Optimisation on the rollouts."""

    @dataclass
    class Config(AlgorithmConfig):
        name: str = "grpo"
        """Registered algorithm name."""
        filter_groups: bool = False
        """Dynamic sampling: drop groups whose rewards are all equal or have std below `min_std`."""
        min_std: float = 0.0
        """Dynamic sampling threshold on the group's unbiased reward std (0 = drop only all-equal groups)."""

        def validate(self) -> list[str]:
            problems = common_problems(self)
            if self.min_std < 0:
                problems.append(f"min_std: must be >= 0, got {self.min_std}")
            return problems

    needs_demos = False
    needs_rollouts = True

    def keep_sequences(self, batch: Batch) -> Tensor:
        if not self.cfg.filter_groups:
            return torch.ones(batch.num_sequences, dtype=torch.bool, device=batch.tokens.device)
        return keep_groups(batch.rewards, batch.prompt_index, ~batch.is_demo, self.cfg.min_std)

    def prepare(self, batch: Batch, plan: StepPlan) -> tuple[Batch, dict[str, Tensor]]:
        return grpo_prepare(self.cfg, batch)

    def metrics_from_stats(self, stats: dict[str, Tensor]) -> dict[str, float]:
        return batch_metrics(stats)

    def loss(self, mb: Batch, logp: Tensor, entropy: Tensor, stats: dict[str, Tensor],
             plan: StepPlan) -> tuple[Tensor, dict[str, Tensor]]:
        return grpo_loss(self.cfg, mb, logp, entropy, stats, self.cfg.kl_coef)
