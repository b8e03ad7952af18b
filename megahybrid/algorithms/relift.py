"""`relift` (SPEC 10.C 4.9, ReLIFT arXiv 2506.07527): GRPO steps, plus SFT phases on the hardest prompts' demos.

1. Every step is a GRPO step (the recipe's Dr. GRPO settings, DrGRPOConfig).
2. `observe_groups`: a prompt whose rollouts all have reward exactly 0 (accuracy 0; the code compares with the fail
   value 0, so -1 format failures do not count) and that has a demo pushes `(example, demo 0)` to the buffer,
   newest first, once per appearance.
3. `extra_phases`, after the step's update: when the buffer holds at least `buffer_size` (M) entries, the M newest
   are popped and one SFT phase runs on them: `sft_epochs` passes in `sft_mini_batch`-example optimizer steps with
   their own AdamW (`sft_lr`, betas (0.9, 0.999), `sft_weight_decay`, clip `sft_grad_clip`), loss
   `token_mean(-w logp over demo tokens) - sft_entropy_coef * token_mean(H)` at temperature 1.0. At most one phase
   per step; `buffer_size: -1` disables the phases (pure RL baseline).

State (checkpointed): the buffer entries in order and the number of SFT phases; the phase optimizer's state is
checkpointed by the trainer (ExtraPhase.name).

Metrics: final `relift/hard_frac` (hardest prompts / B), `relift/buffer_size` (after the step), `relift/sft_phase`
(0/1), and after a phase `relift/sft_loss`, `relift/sft_entropy`, `relift/sft_grad_norm`; plus grpo's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from megahybrid.algorithms.base import Batch, ExtraPhase, GroupSummary, StepPlan
from megahybrid.algorithms.common import DrGRPOConfig, common_problems, sft_token_loss, token_groups
from megahybrid.algorithms.grpo import GRPO
from megahybrid.algorithms.losses import aggregate, token_mean_share
from megahybrid.algorithms.registry import register_algorithm

PHASE = "relift_sft"


@register_algorithm("relift")
class ReLIFT(GRPO):
    """GRPO interleaved with fine-tuning on the demos of the prompts it cannot solve."""

    @dataclass
    class Config(DrGRPOConfig, GRPO.Config):
        """The RL recipe (examples/math-7b/train.sh) is DrGRPOConfig's defaults on grpo's keys; the SFT phase has its
        own keys."""

        name: str = "relift"
        """Registered algorithm name."""
        buffer_size: int = 128
        """M: buffered hardest-prompt demos that trigger an SFT phase (sft_data_size=128); -1 disables SFT."""
        sft_epochs: int = 1
        """Passes over the M examples per SFT phase."""
        sft_mini_batch: int = 128
        """Examples per SFT optimizer step (must divide buffer_size)."""
        sft_entropy_coef: float = 0.001
        """Entropy bonus of the SFT loss (sft.entropy_coeff=0.001)."""
        sft_lr: float = 1.0e-6
        """Learning rate of the SFT phase's own AdamW (optim.sft.lr)."""
        sft_weight_decay: float = 0.01
        """Weight decay of the SFT AdamW."""
        sft_grad_clip: float = 1.0
        """Gradient-norm clip of the SFT steps (sft.sft_grad_clip)."""
        demo_source: Literal["dataset"] = "dataset"
        """Where demos come from: the dataset's `demos` (generation by a stronger model is not in the code)."""

        def validate(self) -> list[str]:
            problems = common_problems(self)
            if self.buffer_size == 0 or self.buffer_size < -1:
                problems.append(f"buffer_size: must be >= 1 (or -1 to disable SFT), got {self.buffer_size}")
            if self.sft_mini_batch < 1 or (self.buffer_size > 0 and self.buffer_size % self.sft_mini_batch):
                problems.append(f"sft_mini_batch ({self.sft_mini_batch}) must be >= 1 and divide buffer_size "
                                f"({self.buffer_size})")
            if self.sft_epochs < 1:
                problems.append(f"sft_epochs: must be >= 1, got {self.sft_epochs}")
            if self.sft_lr <= 0:
                problems.append(f"sft_lr: must be > 0, got {self.sft_lr}")
            return problems

    def __init__(self, cfg, *, seed: int = 0, total_steps: int = 1, **kwargs):
        super().__init__(cfg, seed=seed, total_steps=total_steps, **kwargs)
        self.buffer: list[tuple[int, int]] = []
        """(example index, demo index), newest first."""
        self.num_sft_phases = 0

    # ------------------------------------------------------------------------------------------ buffer
    def observe_groups(self, step: int, groups: list[GroupSummary]) -> dict[str, float]:
        hardest = [g for g in groups if g.rollout_rewards and g.num_demos > 0
                   and all(r == 0.0 for r in g.rollout_rewards)]
        # a group of the step is pushed in step order; the whole step's entries go in front (newest first)
        self.buffer = [(g.example_index, 0) for g in hardest] + self.buffer
        return {"relift/hard_frac": len(hardest) / max(len(groups), 1)}

    def extra_phases(self, step: int) -> list[ExtraPhase]:
        if not self._phase_due():
            return []
        m = self.cfg.buffer_size
        examples, self.buffer = self.buffer[:m], self.buffer[m:]
        c = self.cfg
        return [ExtraPhase(name=PHASE, examples=examples, mini_batch=c.sft_mini_batch, epochs=c.sft_epochs,
                           optimizer={"lr": c.sft_lr, "weight_decay": c.sft_weight_decay, "adam_beta1": 0.9,
                                      "adam_beta2": 0.999, "clip_grad": c.sft_grad_clip}, temperature=1.0)]

    def extra_loss(self, phase: ExtraPhase, mb: Batch, logp: Tensor, entropy: Tensor,
                   stats: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        demo = token_groups(mb)["demo"]
        nll = aggregate(sft_token_loss(mb, logp, demo, self.cfg.sft_weight), demo, "token_mean", stats, "demo")
        ent = aggregate(entropy, demo, "token_mean", stats, "demo")
        return nll - self.cfg.sft_entropy_coef * ent, {"relift/sft_loss": nll.detach(),
                                                       "relift/sft_entropy": token_mean_share(entropy, demo, stats,
                                                                                              "demo")}

    def after_extra_phase(self, phase: ExtraPhase, metrics: dict[str, float]) -> dict[str, float]:
        self.num_sft_phases += 1
        out = {k: v for k, v in metrics.items() if k.startswith("relift/")}
        out["relift/sft_grad_norm"] = metrics.get("grad_norm", float("nan"))
        return out

    def _phase_due(self) -> bool:
        return 0 < self.cfg.buffer_size <= len(self.buffer)

    def after_step(self, plan: StepPlan, grad_norm: float) -> dict[str, float]:
        """Called before `extra_phases`: reports the phase this step is about to run and the buffer after it."""
        due = self._phase_due()
        return {"relift/sft_phase": float(due),
                "relift/buffer_size": float(len(self.buffer) - (self.cfg.buffer_size if due else 0))}

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"buffer": [list(e) for e in self.buffer], "num_sft_phases": self.num_sft_phases}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"buffer", "num_sft_phases"}:
            raise ValueError(f"relift state keys {sorted(state)} != ['buffer', 'num_sft_phases']")
        self.buffer = [(int(i), int(d)) for i, d in state["buffer"]]
        self.num_sft_phases = int(state["num_sft_phases"])
