"""`sasr` (SPEC.md 4.5, SASR Algorithm 1): each step is either an SFT step (demos only, no rollouts generated) or a
GRPO step (rollouts only, KL coefficient `beta`).

Steps are numbered from 0. Steps 0..W-1 (`warmup_steps` = W) are SFT steps; after step W-1 the SFT grad norm is
recorded as `G_warmup` and `G_last_sft = G_warmup`. From step W on, by `schedule`:
- `adaptive`: `p = G_last_sft / (G_last_sft + gamma * G_warmup)`; SFT iff `alpha < p` with `alpha ~ U(0, 1)` from a
  generator seeded by (seed, step) — the same on every rank — and an SFT step updates `G_last_sft`;
- `ssr`: alternate, starting with SFT at step W;
- `ssr_cosine`: `p = 0.5 (1 + cos(pi s / S)) (upper - lower) + lower` with s = step, S = total steps; SFT iff
  `alpha < p` (same seeded draw).
`plan(step)` is a pure function of (state, step); `after_step` is the only mutation. The state (`g_warmup`,
`g_last_sft`, `step` = the last step recorded) round-trips through `state_dict` / `load_state_dict`.

Metrics: plan `sasr/p`, `sasr/is_sft`; after_step `sasr/g_warmup`, `sasr/g_last_sft` (once known); SFT steps as
`sft`, GRPO steps as `grpo` (loss/pg, actor/clip_frac, actor/kl, entropy/rollout*, reward/mean, ...).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from megahybrid.algorithms.base import Algorithm, Batch, StepPlan
from megahybrid.algorithms.common import base_stats, batch_metrics, common_problems
from megahybrid.algorithms.grpo import grpo_loss, grpo_prepare
from megahybrid.algorithms.registry import register_algorithm
from megahybrid.algorithms.sft import sft_demo_loss
from megahybrid.config.schema import AlgorithmConfig

STATE_KEYS = ("g_warmup", "g_last_sft", "step")


def step_uniform(seed: int, step: int) -> float:
    """alpha ~ U(0, 1) from a generator seeded by (seed, step): identical on every rank and after a resume."""
    # torch's CPU generator keeps only the low 32 bits of a seed, so (seed, step) is hashed into 32 bits.
    mixed = int.from_bytes(hashlib.blake2b(f"sasr:{seed}:{step}".encode(), digest_size=4).digest(), "little")
    gen = torch.Generator().manual_seed(mixed)
    return float(torch.rand((), generator=gen, dtype=torch.float64))


def adaptive_p(g_last_sft: float, g_warmup: float, gamma: float) -> float:
    """SASR switching probability `G_last / (G_last + gamma G_warmup)`."""
    denom = g_last_sft + gamma * g_warmup
    return g_last_sft / denom if denom > 0 else 1.0 / (1.0 + gamma)


def cosine_p(step: int, total_steps: int, upper: float, lower: float) -> float:
    """SASR Eq. 13: `0.5 (1 + cos(pi s / S)) (U - L) + L`."""
    return 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1))) * (upper - lower) + lower


@register_algorithm("sasr")
class SASR(Algorithm):
    """Step-wise adaptive choice between an SFT step and a GRPO step."""

    @dataclass
    class Config(AlgorithmConfig):
        name: str = "sasr"
        """Registered algorithm name."""
        schedule: Literal["adaptive", "ssr", "ssr_cosine"] = "adaptive"
        """Step choice after warm-up: grad-norm adaptive, strict alternation, or cosine-decaying SFT probability."""
        warmup_steps: int = 10
        """W: SFT warm-up steps before any GRPO step (the paper does not state a value)."""
        gamma: float = 1.0
        """gamma of p = G_last_sft / (G_last_sft + gamma * G_warmup)."""
        beta: float = 0.04
        """KL-to-reference coefficient of the GRPO steps (SASR Eq. 4; > 0 needs a reference model)."""
        upper: float = 1.0
        """U of ssr_cosine: SFT probability at step 0."""
        lower: float = 0.0
        """L of ssr_cosine: SFT probability at the last step."""

        def validate(self) -> list[str]:
            problems = common_problems(self)
            if self.kl_coef:
                problems.append(f"kl_coef: sasr uses `beta` as the GRPO-step KL coefficient; set beta instead "
                                f"(got kl_coef={self.kl_coef})")
            if self.warmup_steps < (1 if self.schedule == "adaptive" else 0):
                problems.append(f"warmup_steps: the adaptive schedule needs >= 1 warm-up step to measure G_warmup, "
                                f"got {self.warmup_steps}")
            if self.gamma <= 0:
                problems.append(f"gamma: must be > 0, got {self.gamma}")
            if self.beta < 0:
                problems.append(f"beta: must be >= 0, got {self.beta}")
            if not 0 <= self.lower <= self.upper <= 1:
                problems.append(f"lower/upper: need 0 <= lower <= upper <= 1, got lower={self.lower}, "
                                f"upper={self.upper}")
            return problems

    needs_demos = True
    needs_rollouts = True

    def __init__(self, cfg: AlgorithmConfig, *, seed: int = 0, total_steps: int = 1, **kwargs):
        super().__init__(cfg, seed=seed, total_steps=total_steps, **kwargs)
        self.g_warmup: float | None = None
        self.g_last_sft: float | None = None
        self.step = -1

    @property
    def needs_ref(self) -> bool:
        return self.cfg.beta > 0

    # ------------------------------------------------------------------------------------------ schedule
    def sft_probability(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return 1.0
        if cfg.schedule == "ssr":
            return 1.0 if (step - cfg.warmup_steps) % 2 == 0 else 0.0
        if cfg.schedule == "ssr_cosine":
            return cosine_p(step, self.total_steps, cfg.upper, cfg.lower)
        if self.g_warmup is None or self.g_last_sft is None:
            raise RuntimeError(f"sasr step {step}: G_warmup was never recorded; after_step() must be called after "
                               f"each warm-up step (or the scheduler state restored from the checkpoint)")
        return adaptive_p(self.g_last_sft, self.g_warmup, cfg.gamma)

    def plan(self, step: int) -> StepPlan:
        p = self.sft_probability(step)
        if step < self.cfg.warmup_steps or self.cfg.schedule == "ssr":
            is_sft = p >= 1.0
        else:
            is_sft = step_uniform(self.seed, step) < p  # strict: SPEC 9
        return StepPlan(step=step, rollouts=not is_sft, demos=is_sft, old_logp=not is_sft,
                        kind="sft" if is_sft else "rl",
                        metrics={"sasr/p": p, "sasr/is_sft": float(is_sft)})

    def after_step(self, plan: StepPlan, grad_norm: float) -> dict[str, float]:
        if plan.kind == "sft":
            if plan.step == self.cfg.warmup_steps - 1:
                self.g_warmup = float(grad_norm)
                self.g_last_sft = float(grad_norm)
            elif plan.step >= self.cfg.warmup_steps:
                self.g_last_sft = float(grad_norm)
        self.step = plan.step
        return {f"sasr/{k}": v for k, v in (("g_warmup", self.g_warmup), ("g_last_sft", self.g_last_sft))
                if v is not None}

    def state_dict(self) -> dict[str, Any]:
        return {"g_warmup": self.g_warmup, "g_last_sft": self.g_last_sft, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(STATE_KEYS):
            raise ValueError(f"sasr state keys {sorted(state)} != expected {sorted(STATE_KEYS)}")
        self.g_warmup = None if state["g_warmup"] is None else float(state["g_warmup"])
        self.g_last_sft = None if state["g_last_sft"] is None else float(state["g_last_sft"])
        self.step = int(state["step"])

    # ------------------------------------------------------------------------------------------ losses
    def prepare(self, batch: Batch, plan: StepPlan) -> tuple[Batch, dict[str, Tensor]]:
        if plan.kind == "sft":
            return batch, base_stats(batch)
        return grpo_prepare(self.cfg, batch)

    def metrics_from_stats(self, stats: dict[str, Tensor]) -> dict[str, float]:
        return batch_metrics(stats)

    def loss(self, mb: Batch, logp: Tensor, entropy: Tensor, stats: dict[str, Tensor],
             plan: StepPlan) -> tuple[Tensor, dict[str, Tensor]]:
        if plan.kind == "sft":
            return sft_demo_loss(self.cfg, mb, logp, entropy, stats, kl_coef=0.0)
        return grpo_loss(self.cfg, mb, logp, entropy, stats, kl_coef=self.cfg.beta)
