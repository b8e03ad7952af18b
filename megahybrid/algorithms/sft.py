"""`sft` (SRFT Eq. 1: NLL over demo tokens) and `sft_kl` (SRFT Eq. A1: plus `kl_coef` x token-level KL to the
reference over the same demo tokens; default lambda = 0.2, estimator k3). SPEC.md 4.1.

Metrics: `loss/sft`, `entropy/demo` (shares); `response_length/demo`, `batch/num_prompts` (final);
`sft_kl` adds `loss/kl`, `actor/kl`.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from megahybrid.algorithms.base import Algorithm, Batch, StepPlan
from megahybrid.algorithms.common import aggregate_regularisers, base_stats, batch_metrics, common_problems, \
    entropy_metrics, regulariser_parts, sft_token_loss, token_groups
from megahybrid.algorithms.losses import aggregate
from megahybrid.algorithms.registry import register_algorithm
from megahybrid.config.schema import AlgorithmConfig


def sft_demo_loss(cfg: AlgorithmConfig, mb: Batch, logp: Tensor, entropy: Tensor, stats: dict[str, Tensor],
                  kl_coef: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Globally aggregated NLL over the demo tokens (+ kl_coef x KL), and its metric shares. The entropy bonus is
    a policy-gradient term (SPEC 3) and is not applied to SFT tokens."""
    mask = token_groups(mb)["demo"]
    nll = aggregate(sft_token_loss(mb, logp, mask, cfg.sft_weight), mask, cfg.loss_agg, stats, "demo")
    reg, metrics = aggregate_regularisers(cfg, regulariser_parts(cfg, mb, logp, entropy, mask, kl_coef), mask,
                                          stats, "demo", kl_coef, entropy_coef=0.0)
    metrics["loss/sft"] = nll.detach()
    metrics.update(entropy_metrics(mb, entropy, stats, ["demo"]))
    return nll + reg, metrics


@register_algorithm("sft")
class SFT(Algorithm):
    """Supervised fine-tuning on the demonstrations only (no rollouts, no old log-probs)."""

    @dataclass
    class Config(AlgorithmConfig):
        name: str = "sft"
        """Registered algorithm name."""

        def validate(self) -> list[str]:
            problems = common_problems(self)
            if self.kl_coef > 0:
                problems.append(f"kl_coef: sft has no KL term (got {self.kl_coef}); use name: sft_kl")
            return problems

    needs_demos = True
    needs_rollouts = False
    needs_old_logp = False

    @property
    def needs_ref(self) -> bool:
        return False

    def prepare(self, batch: Batch, plan: StepPlan) -> tuple[Batch, dict[str, Tensor]]:
        return batch, base_stats(batch)

    def metrics_from_stats(self, stats: dict[str, Tensor]) -> dict[str, float]:
        return batch_metrics(stats)

    def loss(self, mb: Batch, logp: Tensor, entropy: Tensor, stats: dict[str, Tensor],
             plan: StepPlan) -> tuple[Tensor, dict[str, Tensor]]:
        return sft_demo_loss(self.cfg, mb, logp, entropy, stats, kl_coef=0.0)


@register_algorithm("sft_kl")
class SFTKL(SFT):
    """SFT plus `kl_coef` x per-token KL(pi_theta || pi_ref) over the demo tokens (SRFT Eq. A1)."""

    @dataclass
    class Config(AlgorithmConfig):
        name: str = "sft_kl"
        """Registered algorithm name."""
        kl_coef: float = 0.2
        """lambda of SRFT Eq. A1: weight of the token-level KL to the reference over the demo tokens."""

        def validate(self) -> list[str]:
            return common_problems(self)

    @property
    def needs_ref(self) -> bool:
        return self.cfg.kl_coef > 0

    def loss(self, mb: Batch, logp: Tensor, entropy: Tensor, stats: dict[str, Tensor],
             plan: StepPlan) -> tuple[Tensor, dict[str, Tensor]]:
        return sft_demo_loss(self.cfg, mb, logp, entropy, stats, kl_coef=self.cfg.kl_coef)
