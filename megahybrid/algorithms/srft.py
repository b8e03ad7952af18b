"""`srft` (SPEC.md 4.3, SRFT Eq. 5-13): one step on demos and rollouts together,

    L = L_sft_demo + L_rl_demo + L_self,    each term aggregated with `loss_agg` over its own token group:

- advantages over the augmented group (the prompt's K rollouts + its demos; rollouts only when it has none);
- `L_sft_demo = agg_demo(w_sft * NLL)`, `w_sft = sft_coef * exp(-H_demo)`;
- `L_rl_demo = agg_demo(-A_demo * exp(logp))` (off-policy, behaviour prob 1, no clip);
- `L_self` (`self_rollout_loss: grpo`) = agg_rollout(clipped surrogate x TIS, times `w_rl = rl_coef * exp(H_pos)`
  on positive rollouts (R > 0)) + KL + entropy bonus; (`reinforce`) = agg_pos(w_rl * NLL) + agg_neg(logp), plus
  the KL / entropy terms aggregated over all rollout tokens.

Entropy weights are constants built from the old policy's entropies `H_old` (`entropy_scope: batch`: the global
token mean over demo / positive-rollout tokens, all-reduced through the statistics; `token`: each token's own).

Metrics: shares `loss/sft_demo`, `loss/rl_demo`, `loss/self` (grpo) or `loss/self_pos` + `loss/self_neg`
(reinforce), `loss/kl`, `actor/kl` (kl_coef > 0), `loss/entropy` (entropy_coef != 0), `actor/clip_frac` (grpo),
`entropy/demo`, `entropy/rollout`, `entropy/rollout_pos`, `entropy/rollout_neg`, and with `entropy_scope: token`
`srft/w_sft`, `srft/w_rl` (token means); final `srft/w_sft`, `srft/w_rl` (otherwise), `reward/mean`,
`response_length/mean`, `response_length/demo`, `batch/num_prompts`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from megahybrid.algorithms.advantages import group_advantages
from megahybrid.algorithms.base import Algorithm, Batch, StepPlan
from megahybrid.algorithms.common import ADV, aggregate_pg, aggregate_regularisers, base_stats, batch_metrics, \
    common_problems, entropy_metrics, pg_token_parts, regulariser_parts, require, token_groups
from megahybrid.algorithms.grpo import with_fields
from megahybrid.algorithms.losses import STAT_DTYPE, aggregate, demo_surrogate, masked, token_mean_share
from megahybrid.algorithms.registry import register_algorithm
from megahybrid.config.schema import AlgorithmConfig

ENTROPY_GROUPS = ("demo", "rollout", "rollout_pos", "rollout_neg")


@register_algorithm("srft")
class SRFT(Algorithm):
    """Supervised Reinforcement Fine-Tuning with entropy-aware weights."""

    @dataclass
    class Config(AlgorithmConfig):
        name: str = "srft"
        """Registered algorithm name."""
        self_rollout_loss: Literal["grpo", "reinforce"] = "grpo"
        """Self-rollout term: clipped GRPO surrogate (w_rl on positive rollouts) or literal Eq. 12 REINFORCE."""
        entropy_scope: Literal["batch", "token"] = "batch"
        """Entropy in the weights: global token mean of the group (batch) or each token's own (token)."""
        sft_coef: float = 0.5
        """Coefficient of w_sft = sft_coef * exp(-H_demo)."""
        rl_coef: float = 0.1
        """Coefficient of w_rl = rl_coef * exp(H_pos)."""
        entropy_weights: bool = True
        """False fixes both w_sft and w_rl at 1.0."""
        sft_coef_fixed: float | None = None
        """Ablation `w/o w_SFT`: use this constant as w_sft (the paper uses 1.0); None = entropy-aware."""
        rl_coef_fixed: float | None = None
        """Ablation `w/o w_RL`: use this constant as w_rl (the paper uses 1.0); None = entropy-aware."""
        demo_reward: Literal["verify", "one"] = "verify"
        """Demo rewards: as scored by the reward function (verify) or overwritten with 1 in prepare (one)."""

        def validate(self) -> list[str]:
            problems = common_problems(self)
            for key in ("sft_coef", "rl_coef", "sft_coef_fixed", "rl_coef_fixed"):
                value = getattr(self, key)
                if value is not None and value < 0:
                    problems.append(f"{key}: must be >= 0, got {value}")
            if not self.entropy_weights:  # SPEC 9: the two settings say different things about the same weight
                for key in ("sft_coef_fixed", "rl_coef_fixed"):
                    if getattr(self, key) is not None:
                        problems.append(f"{key}: cannot be set with entropy_weights: false (which fixes both "
                                        f"weights at 1.0); drop one of the two")
            return problems

    needs_demos = True
    needs_rollouts = True

    @property
    def old_logp_before_loss(self) -> bool:
        """Batch-scope entropy weights are global means of H_old, all-reduced before the first loss."""
        return super().old_logp_before_loss or "batch" in (self._weight_source("sft"), self._weight_source("rl"))

    def prepare(self, batch: Batch, plan: StepPlan) -> tuple[Batch, dict[str, Tensor]]:
        if self.cfg.demo_reward == "one":
            batch = dataclasses.replace(batch, rewards=torch.where(batch.is_demo, torch.ones_like(batch.rewards),
                                                                   batch.rewards))
        members = torch.ones_like(batch.is_demo)  # augmented group: rollouts and demos of the prompt
        adv = group_advantages(batch.rewards, batch.prompt_index, members, self.cfg.norm_adv_by_std,
                               self.cfg.adv_eps)
        batch = with_fields(batch, **{ADV: adv})
        stats = base_stats(batch)
        if self._weight_source("sft") == "batch" or self._weight_source("rl") == "batch":
            old_h = require(batch, "old_entropy", "srft entropy_scope=batch weights need H_old")
            groups = token_groups(batch)
            for g in ("demo", "rollout_pos"):
                stats[f"sum/old_entropy_{g}"] = masked(old_h, groups[g]).detach().sum().to(STAT_DTYPE)
        return batch, stats

    def _weight_source(self, which: str) -> str:
        """Where w_sft / w_rl comes from: `const`, `batch` (global mean H_old) or `token` (own H_old)."""
        fixed = self.cfg.sft_coef_fixed if which == "sft" else self.cfg.rl_coef_fixed
        if not self.cfg.entropy_weights or fixed is not None:
            return "const"
        return self.cfg.entropy_scope

    def _const_weight(self, which: str, stats: dict[str, Tensor]) -> float:
        """The weight when it is the same for every token (const or batch scope)."""
        if not self.cfg.entropy_weights:
            return 1.0
        fixed = self.cfg.sft_coef_fixed if which == "sft" else self.cfg.rl_coef_fixed
        if fixed is not None:
            return fixed
        group = "demo" if which == "sft" else "rollout_pos"
        mean_h = stats[f"sum/old_entropy_{group}"].to(STAT_DTYPE) / stats[f"num_tokens/{group}"].clamp(min=1)
        return float(self._entropy_weight(which, mean_h))

    def _entropy_weight(self, which: str, h: Tensor) -> Tensor:
        """w_sft = sft_coef exp(-H) or w_rl = rl_coef exp(H), elementwise."""
        return self.cfg.sft_coef * torch.exp(-h) if which == "sft" else self.cfg.rl_coef * torch.exp(h)

    def _weight(self, which: str, mb: Batch, mask: Tensor, stats: dict[str, Tensor], like: Tensor) -> Tensor:
        """[S, T] constant weight on `mask` tokens (0 elsewhere does not matter: the mask is applied later)."""
        if self._weight_source(which) == "token":
            old_h = masked(require(mb, "old_entropy", "srft entropy_scope=token weights need H_old"), mask)
            return self._entropy_weight(which, old_h).to(like.dtype).detach()
        return torch.full_like(like, self._const_weight(which, stats))

    def metrics_from_stats(self, stats: dict[str, Tensor]) -> dict[str, float]:
        out = batch_metrics(stats)
        for which in ("sft", "rl"):
            if self._weight_source(which) != "token":
                out[f"srft/w_{which}"] = self._const_weight(which, stats)
        return out

    def loss(self, mb: Batch, logp: Tensor, entropy: Tensor, stats: dict[str, Tensor],
             plan: StepPlan) -> tuple[Tensor, dict[str, Tensor]]:
        groups = token_groups(mb)
        demo, pos = groups["demo"], groups["rollout_pos"]
        w_sft = self._weight("sft", mb, demo, stats, logp)
        w_rl = self._weight("rl", mb, pos, stats, logp)
        lp_demo = masked(logp, demo)
        adv = mb.fields[ADV].to(logp.dtype)[:, None]
        sft_demo = aggregate(-w_sft * lp_demo, demo, self.cfg.loss_agg, stats, "demo")
        rl_demo = aggregate(demo_surrogate(lp_demo, adv), demo, self.cfg.loss_agg, stats, "demo")
        if self.cfg.self_rollout_loss == "grpo":
            self_loss, metrics = self._self_grpo(mb, logp, entropy, stats, groups, w_rl)
        else:
            self_loss, metrics = self._self_reinforce(mb, logp, entropy, stats, groups, w_rl)
        metrics.update({"loss/sft_demo": sft_demo.detach(), "loss/rl_demo": rl_demo.detach()})
        metrics.update(entropy_metrics(mb, entropy, stats, ENTROPY_GROUPS))
        if self._weight_source("sft") == "token":
            metrics["srft/w_sft"] = token_mean_share(w_sft, demo, stats, "demo")
        if self._weight_source("rl") == "token":
            metrics["srft/w_rl"] = token_mean_share(w_rl, pos, stats, "rollout_pos")
        return sft_demo + rl_demo + self_loss, metrics

    def _self_grpo(self, mb, logp, entropy, stats, groups, w_rl) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped surrogate on every rollout token; w_rl multiplies it on positive-rollout tokens only."""
        weight = torch.where(groups["rollout_pos"], w_rl, torch.ones_like(w_rl))
        parts = pg_token_parts(self.cfg, mb, logp, entropy, groups["rollout"], mb.fields[ADV], self.cfg.kl_coef,
                               surrogate_weight=weight)
        return aggregate_pg(self.cfg, parts, groups["rollout"], stats, "rollout", self.cfg.kl_coef,
                            prefix="loss/self")

    def _self_reinforce(self, mb, logp, entropy, stats, groups, w_rl) -> tuple[Tensor, dict[str, Tensor]]:
        """Literal Eq. 12: `w_rl * NLL(positive rollouts) + mean logp(negative rollouts)`, aggregated separately;
        KL and entropy bonus over all rollout tokens."""
        cfg, pos, neg, roll = self.cfg, groups["rollout_pos"], groups["rollout_neg"], groups["rollout"]
        pos_loss = aggregate(-w_rl * masked(logp, pos), pos, cfg.loss_agg, stats, "rollout_pos")
        neg_loss = aggregate(masked(logp, neg), neg, cfg.loss_agg, stats, "rollout_neg")
        parts = regulariser_parts(cfg, mb, logp, entropy, roll, cfg.kl_coef)
        reg, metrics = aggregate_regularisers(cfg, parts, roll, stats, "rollout", cfg.kl_coef,
                                             cfg.entropy_coef)
        metrics.update({"loss/self_pos": pos_loss.detach(), "loss/self_neg": neg_loss.detach()})
        loss = pos_loss + neg_loss + reg
        return loss, metrics
