"""`dft` (SPEC 10.C 4.10, Dynamic Fine-Tuning, arXiv 2508.05629): SFT whose token NLL is weighted by the token's own
probability, detached: `l_t = -sg(p_t) logp_t`, token mean over all demo tokens of the global batch (DFT README's
"one-line change"; TRL `dft_loss`). It is `sft` with `sft_weight: dft`; this file only fixes that default and adds
the unweighted NLL as a metric (DFT logs it as `train/original_loss`).

Metrics: shares `dft/loss` (= `loss/sft`), `dft/nll` (unweighted token-mean NLL), `entropy/demo`; final
`response_length/demo`, `batch/num_prompts`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from megahybrid.algorithms.base import Batch, StepPlan
from megahybrid.algorithms.common import common_problems, sft_token_loss, token_groups
from megahybrid.algorithms.losses import aggregate
from megahybrid.algorithms.registry import register_algorithm
from megahybrid.algorithms.sft import SFT, sft_demo_loss
from megahybrid.config.schema import AlgorithmConfig


@register_algorithm("dft")
class DFT(SFT):
    """SFT with the probability-weighted NLL."""

    @dataclass
    class Config(AlgorithmConfig):
        name: str = "dft"
        """Registered algorithm name."""
        sft_weight: Literal["none", "dft", "phi"] = "dft"
        """Weight of the demo-token NLL; DFT is `dft` (w = sg(p)); other values make it plain / phi SFT."""

        def validate(self) -> list[str]:
            problems = common_problems(self)
            if self.kl_coef > 0:
                problems.append(f"kl_coef: dft has no KL term (got {self.kl_coef})")
            return problems

    def loss(self, mb: Batch, logp: Tensor, entropy: Tensor, stats: dict[str, Tensor],
             plan: StepPlan) -> tuple[Tensor, dict[str, Tensor]]:
        loss, metrics = sft_demo_loss(self.cfg, mb, logp, entropy, stats, kl_coef=0.0)
        demo = token_groups(mb)["demo"]
        metrics["dft/loss"] = metrics["loss/sft"]
        metrics["dft/nll"] = aggregate(sft_token_loss(mb, logp.detach(), demo), demo, "token_mean", stats, "demo")
        return loss, metrics
