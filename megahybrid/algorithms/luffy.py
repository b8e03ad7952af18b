"""`luffy` (SPEC 10.C 4.7, LUFFY arXiv 2504.14945): off-policy demos mixed into the rollout group.

Per prompt with demos the group is `rollout.n` members: `M = n_demos` demos and `n - M` rollouts (`keep_sequences`
keeps the first n - M rollouts and the first M demos; the engine still samples n per prompt, so M samples of engine
time per prompt are spent and dropped: the trainer has no per-method sample count). Prompts without a demo keep n.

- advantages over all members (`adv_group: all`) or with the rollouts' statistics (`rollouts`): `A = R - mean`
  (`norm_adv_by_std: false`, the released recipe) or `/ (std + eps)`;
- demo tokens (policy shaping): `l = -A f(p)`, `f(p) = p / (p + gamma)` (`gamma: null`: `f(p) = p`), no old-policy
  ratio, no clipping, no rollout-correction weight;
- rollout tokens: `l = -A exp(c(logp - logp_old))` (`clip: false`, recipe) or the clipped surrogate, times the
  rollout-correction weight;
- one loss over the mixed token set with `loss_agg` (default `seq_mean_token_sum_norm`), minus
  `entropy_coef * token_mean(H)` over every response token (demo and rollout), whatever `loss_agg` is.

Metrics: shares `loss/pg`, `loss/entropy`, `luffy/off_pg_loss`, `luffy/on_pg_loss` (token means over each set),
`luffy/off_prob_mean`, `luffy/on_prob_mean` (mean exp(logp_old) over rollout tokens), `luffy/f_mean`,
`actor/clip_frac`, `entropy/*`; final `luffy/demo_solved`, `luffy/rollout_solved` (fractions with R > 0),
`luffy/solve_none`, `luffy/solve_all` (prompt counts over rollouts), `reward/mean`, lengths.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from megahybrid.algorithms.advantages import dense_groups, group_moments, per_group_sum
from megahybrid.algorithms.base import Algorithm, Batch, StepPlan
from megahybrid.algorithms.common import ADV, DrGRPOConfig, base_stats, batch_metrics, common_problems, \
    entropy_metrics, pg_token_parts, require, token_groups
from megahybrid.algorithms.grpo import with_fields
from megahybrid.algorithms.losses import STAT_DTYPE, aggregate, group_counts, masked, token_mean_share
from megahybrid.algorithms.registry import register_algorithm


def shaped_prob(logp: Tensor, gamma: float | None) -> Tensor:
    """LUFFY's policy shaping `f(p) = p / (p + gamma)` (gamma None: `p`), differentiable in logp."""
    p = torch.exp(logp)
    return p if gamma is None else p / (p + gamma)


def rank_in_group(prompt_index: Tensor, member: Tensor) -> Tensor:
    """[S] 0-based position of each member among its group's members, in batch order (non-members: -1)."""
    gid, num_groups = dense_groups(prompt_index)
    seen = [0] * num_groups
    out = torch.full_like(prompt_index, -1)
    for s, (g, m) in enumerate(zip(gid.tolist(), member.tolist())):
        if m:
            out[s], seen[g] = seen[g], seen[g] + 1
    return out


def mixed_group_advantages(batch: Batch, rollouts_only: bool, norm: bool, eps: float) -> Tensor:
    """[S] advantages of every sequence (rollouts and demos) from its group's statistics over all members, or over
    the rollouts only. A group whose statistics members all have equal rewards gets A = 0 (SPEC 2/9)."""
    member = ~batch.is_demo if rollouts_only else torch.ones_like(batch.is_demo)
    g = group_moments(batch.rewards, batch.prompt_index, member)
    adv = batch.rewards.detach() - g["mean"]
    if norm:
        adv = adv / (g["std"] + eps)
    return torch.where(g["constant"], torch.zeros_like(adv), adv)


@register_algorithm("luffy")
class LUFFY(Algorithm):
    """Learning under off-policy guidance: demos in the GRPO group with policy shaping."""

    @dataclass
    class Config(DrGRPOConfig):
        """The recipe's RL settings (DrGRPOConfig); `loss_agg` aggregates the mixed demo + rollout token loss and
        the entropy bonus is a token mean over every response token."""

        name: str = "luffy"
        """Registered algorithm name."""
        n_demos: int = 1
        """M: demos per prompt in the group (they take M of the rollout.n slots; recipe n_prefix=1)."""
        gamma: float | None = 0.1
        """Policy-shaping constant of f(p) = p / (p + gamma) (recipe `p_div_p_0.1`); null: f(p) = p."""
        adv_group: Literal["all", "rollouts"] = "all"
        """Advantage statistics over all group members (default) or the rollouts only (`grpo_split`)."""

        def validate(self) -> list[str]:
            problems = common_problems(self)
            if self.n_demos < 1:
                problems.append(f"n_demos: must be >= 1, got {self.n_demos}")
            if self.gamma is not None and self.gamma <= 0:
                problems.append(f"gamma: must be > 0 (or null for f(p) = p), got {self.gamma}")
            if self.kl_coef > 0:
                problems.append(f"kl_coef: luffy has no KL term (got {self.kl_coef})")
            return problems

    needs_demos = True
    needs_rollouts = True

    def keep_sequences(self, batch: Batch) -> Tensor:
        """First `n - M` rollouts and first `M` demos of a prompt with demos; all rollouts of one without."""
        demo_rank = rank_in_group(batch.prompt_index, batch.is_demo)
        roll_rank = rank_in_group(batch.prompt_index, ~batch.is_demo)
        gid, _ = dense_groups(batch.prompt_index)
        num_demos = per_group_sum(batch.is_demo.to(torch.float64), batch.prompt_index)[gid]
        num_rolls = per_group_sum((~batch.is_demo).to(torch.float64), batch.prompt_index)[gid]
        m = num_demos.clamp(max=self.cfg.n_demos)
        keep_roll = ~batch.is_demo & (roll_rank < (num_rolls - m))
        keep_demo = batch.is_demo & (demo_rank < self.cfg.n_demos)
        return keep_roll | keep_demo

    def prepare(self, batch: Batch, plan: StepPlan) -> tuple[Batch, dict[str, Tensor]]:
        cfg = self.cfg
        adv = mixed_group_advantages(batch, cfg.adv_group == "rollouts", cfg.norm_adv_by_std, cfg.adv_eps)
        batch = with_fields(batch, **{ADV: adv})
        stats = base_stats(batch)
        stats.update(group_counts("response", batch.response_mask))
        rollout = ~batch.is_demo
        solved = (batch.rewards > 0).to(STAT_DTYPE)
        n_roll = per_group_sum(rollout.to(STAT_DTYPE), batch.prompt_index)
        n_solved = per_group_sum(solved * rollout, batch.prompt_index)
        stats.update({"luffy/demo_solved": (solved * batch.is_demo).sum(),
                      "luffy/rollout_solved": (solved * rollout).sum(),
                      "luffy/solve_none": ((n_roll > 0) & (n_solved == 0)).sum().to(STAT_DTYPE),
                      "luffy/solve_all": ((n_roll > 0) & (n_solved == n_roll)).sum().to(STAT_DTYPE)})
        return batch, stats

    def metrics_from_stats(self, stats: dict[str, Tensor]) -> dict[str, float]:
        out = batch_metrics(stats)
        out["luffy/demo_solved"] = float(stats["luffy/demo_solved"]) / max(float(stats["num_demos"]), 1.0)
        out["luffy/rollout_solved"] = float(stats["luffy/rollout_solved"]) / max(float(stats["num_rollouts"]), 1.0)
        out["luffy/solve_none"] = float(stats["luffy/solve_none"])
        out["luffy/solve_all"] = float(stats["luffy/solve_all"])
        return out

    def loss(self, mb: Batch, logp: Tensor, entropy: Tensor, stats: dict[str, Tensor],
             plan: StepPlan) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, groups = self.cfg, token_groups(mb)
        demo, roll, resp = groups["demo"], groups["rollout"], mb.response_mask
        adv = mb.fields[ADV].to(logp.dtype)[:, None]
        f = shaped_prob(masked(logp, demo), cfg.gamma)
        off = masked(-adv * f, demo)
        parts = pg_token_parts(cfg, mb, logp, entropy, roll, mb.fields[ADV], kl_coef=0.0)
        on = masked(parts["surrogate"], roll)
        pg = aggregate(off + on, resp, cfg.loss_agg, stats, "response")
        ent = -cfg.entropy_coef * aggregate(entropy, resp, "token_mean", stats, "response")
        old = masked(require(mb, "old_logp", "luffy logs the rollout tokens' old-policy probability"), roll)
        metrics = {"loss/pg": pg.detach(), "loss/entropy": ent.detach(),
                   "luffy/off_pg_loss": token_mean_share(off, demo, stats, "demo"),
                   "luffy/on_pg_loss": token_mean_share(on, roll, stats, "rollout"),
                   "luffy/off_prob_mean": token_mean_share(torch.exp(masked(logp, demo)), demo, stats, "demo"),
                   "luffy/on_prob_mean": token_mean_share(torch.exp(old), roll, stats, "rollout"),
                   "luffy/f_mean": token_mean_share(f, demo, stats, "demo"),
                   "actor/clip_frac": token_mean_share(parts["clipped"].to(logp.dtype), roll, stats, "rollout")}
        metrics.update(entropy_metrics(mb, entropy, stats, ("demo", "rollout", "rollout_pos", "rollout_neg")))
        return pg + ent, metrics
