"""`chord` (SPEC 10.C 4.8, CHORD arXiv 2508.11408; Trinity-RFT `mix_chord`, ms-swift `--chord_*`): GRPO on rollouts
plus a scheduled, phi-weighted SFT term on expert sequences,

    L = (1 - mu_s) L_GRPO + mu_s L_SFT.

- `L_GRPO`: clipped surrogate (dual clip 3.0) over rollout tokens with rollout-only group advantages, `loss_agg`,
  KL/entropy as configured (entropy over rollout tokens only);
- `L_SFT` over expert tokens: `-phi_t * min(logp_t, log cutoff_prob)`, `phi = sg(p (1 - p))` with `phi: true`,
  else 1 (then `sft_weight` applies), token mean (`token_level_sft: true`) or `seq_mean_token_mean`;
- `mu_s` (`mu_schedule`): linear warm-up to `mu_peak` over `mu_warmup_steps`, cosine decay to `mu_valley` over
  `mu_decay_steps`, then constant; `s` = optimizer steps completed before this step (the trainer's checkpointed
  step, so the schedule position needs no state of its own). `mu_s = 0` plans no demos (the expert forward is
  skipped); `mu_s = 1` plans no rollouts.

Expert data [ours, deviation]: the expert sequences are the demos of the step's own prompts, not a separate stream
(the trainer loads demos per prompt). `keep_sequences` keeps `E = ceil(rho / (1 - rho) * rollouts)` of them (the
first E in batch order), which gives Trinity's expert share `expert_ratio` of the trained sequences.

Metrics: final `chord/mu` (plan), `chord/expert_tokens`; shares `chord/grpo_loss`, `chord/sft_loss`,
`chord/phi_mean`, `loss/pg`, `actor/clip_frac`, `entropy/*`; final `reward/mean`, lengths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from megahybrid.algorithms.base import Algorithm, Batch, StepPlan
from megahybrid.algorithms.common import batch_metrics, common_problems, entropy_metrics, token_groups
from megahybrid.algorithms.grpo import grpo_loss, grpo_prepare
from megahybrid.algorithms.losses import aggregate, masked, sft_token_weight, token_mean_share
from megahybrid.algorithms.registry import register_algorithm
from megahybrid.config.schema import AlgorithmConfig


def mu_schedule(s: int, warmup: int, decay: int, peak: float, valley: float) -> float:
    """CHORD's `mu_schedule_function` (Trinity / ms-swift) at 0-based step `s`."""
    if s < warmup:
        return peak * s / warmup
    if s >= warmup + decay:
        return valley
    return valley + (peak - valley) * 0.5 * (1.0 + math.cos(math.pi * (s - warmup) / decay))


@register_algorithm("chord")
class CHORD(Algorithm):
    """GRPO + mu-scheduled phi-weighted SFT on expert sequences."""

    @dataclass
    class Config(AlgorithmConfig):
        name: str = "chord"
        """Registered algorithm name."""
        expert_ratio: float = 0.2
        """rho: expert share of the trained sequences (mix_chord.yaml `expert_data_ratio: 0.20`)."""
        mu_warmup_steps: int = 0
        """W: steps of linear warm-up of mu from 0 to mu_peak (CHORD-phi default 0)."""
        mu_decay_steps: int = 0
        """D: steps of cosine decay from mu_peak to mu_valley (CHORD-phi default 0; preset chord_mu: 200)."""
        mu_peak: float = 0.1
        """Peak mu (CHORD-phi 0.1; chord_mu 0.9)."""
        mu_valley: float = 0.1
        """Final mu (CHORD-phi 0.1; chord_mu 0.05)."""
        phi: bool = True
        """Weight the expert NLL by sg(p (1 - p)) (CHORD-phi); false: weight 1 (or `sft_weight`)."""
        cutoff_prob: float = 1.0
        """The NLL's logp is clamped to <= log(cutoff_prob) (1.0 = off); phi uses the unclamped p."""
        token_level_sft: bool = True
        """SFT part as a token mean over all expert tokens (`use_token_level_loss_in_sft`); false: mean of
        per-sequence token means."""
        clip_ratio_c: float | None = 3.0
        """Dual-clip constant of L_GRPO (Trinity PPOPolicyLossFn applies 3.0)."""

        def validate(self) -> list[str]:
            problems = common_problems(self)
            if not 0 < self.expert_ratio < 1:
                problems.append(f"expert_ratio: must be in (0, 1) (the expert share of the sequences), got "
                                f"{self.expert_ratio}")
            if self.mu_warmup_steps < 0 or self.mu_decay_steps < 0:
                problems.append(f"mu_warmup_steps/mu_decay_steps: must be >= 0, got {self.mu_warmup_steps}, "
                                f"{self.mu_decay_steps}")
            for key in ("mu_peak", "mu_valley"):
                if not 0 <= getattr(self, key) <= 1:
                    problems.append(f"{key}: must be in [0, 1], got {getattr(self, key)}")
            if not 0 < self.cutoff_prob <= 1:
                problems.append(f"cutoff_prob: must be in (0, 1], got {self.cutoff_prob}")
            return problems

    needs_demos = True
    needs_rollouts = True

    def mu(self, step: int) -> float:
        c = self.cfg
        return mu_schedule(step, c.mu_warmup_steps, c.mu_decay_steps, c.mu_peak, c.mu_valley)

    def plan(self, step: int) -> StepPlan:
        mu = self.mu(step)
        return StepPlan(step=step, rollouts=mu < 1.0, demos=mu > 0.0, old_logp=mu < 1.0,
                        kind="hybrid" if 0 < mu < 1 else ("sft" if mu >= 1 else "rl"), metrics={"chord/mu": mu})

    def keep_sequences(self, batch: Batch) -> Tensor:
        num_rollouts = int((~batch.is_demo).sum())
        if num_rollouts == 0:  # an SFT-only step (mu = 1 plans no rollouts): every expert sequence trains
            return torch.ones_like(batch.is_demo)
        rho = self.cfg.expert_ratio
        want = math.ceil(rho / (1.0 - rho) * num_rollouts - 1e-9)  # -1e-9: rho = 0.2 must give exactly 1/4
        demo_rank = torch.cumsum(batch.is_demo.to(torch.long), 0) - 1
        return ~batch.is_demo | (batch.is_demo & (demo_rank < want))

    def prepare(self, batch: Batch, plan: StepPlan) -> tuple[Batch, dict[str, Tensor]]:
        return grpo_prepare(self.cfg, batch)

    def metrics_from_stats(self, stats: dict[str, Tensor]) -> dict[str, float]:
        out = batch_metrics(stats)
        out["chord/expert_tokens"] = float(stats["num_tokens/demo"])
        return out

    def loss(self, mb: Batch, logp: Tensor, entropy: Tensor, stats: dict[str, Tensor],
             plan: StepPlan) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, mu = self.cfg, plan.metrics["chord/mu"]
        demo = token_groups(mb)["demo"]
        lp = masked(logp, demo)
        weight = sft_token_weight(lp, "phi" if cfg.phi else cfg.sft_weight)
        nll = -torch.clamp(lp, max=math.log(cfg.cutoff_prob)) * (1.0 if weight is None else weight)
        sft = aggregate(nll, demo, "token_mean" if cfg.token_level_sft else "seq_mean_token_mean", stats, "demo")
        if plan.rollouts:
            grpo, metrics = grpo_loss(cfg, mb, logp, entropy, stats, cfg.kl_coef)
        else:  # mu = 1: an SFT-only step without rollouts (and without the old-policy pass)
            grpo, metrics = torch.zeros((), dtype=logp.dtype, device=logp.device), {}
        metrics.update({"chord/grpo_loss": grpo.detach(), "chord/sft_loss": sft.detach()})
        if weight is not None:
            metrics["chord/phi_mean"] = token_mean_share(weight, demo, stats, "demo")
        metrics.update(entropy_metrics(mb, entropy, stats, ("demo",)))
        return (1.0 - mu) * grpo + mu * sft, metrics
