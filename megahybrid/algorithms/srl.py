"""`srl` (SPEC.md 4.6, Supervised RL): GRPO (section 4.2) with `kl_coef = 0` and dynamic sampling on (drop groups
whose reward std is below `min_std`, default 1e-4), on step-wise instances built from expert solutions.

Only the loss side lives here; the step splitter / instance builder (`step_pattern`, `first_step`) and the difflib
similarity reward (`require_think`) read these fields from the data and rewards packages. Metrics: as `grpo`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from megahybrid.algorithms.grpo import GRPO
from megahybrid.algorithms.registry import register_algorithm


@register_algorithm("srl")
class SRL(GRPO):
    """GRPO on step-wise SRL instances with a std filter."""

    @dataclass
    class Config(GRPO.Config):
        name: str = "srl"
        """Registered algorithm name."""
        kl_coef: float = 0.0
        """Per-token KL-to-reference coefficient (SRL trains without a KL term)."""
        filter_groups: bool = True
        """Dynamic sampling on: drop groups whose reward std is below `min_std`."""
        min_std: float = 1e-4
        """Dynamic sampling threshold on the group's unbiased reward std."""
        step_pattern: str | None = None
        """Regex (Python `re`, applied case-insensitive and multi-line) matching the start of each step of an expert
        solution; None = the splitter's built-in numbered-line pattern (`1.`, `Step 1:`, `**Step 1**`, see
        megahybrid/data/srl.py). Fewer than 2 matches: blank-line paragraphs."""
        first_step: bool = False
        """Also build the instance k = 1 (empty previous steps); by default instances are k = 2..N."""
        require_think: bool = True
        """Reward -1 unless a `<think>` comes before the last `</think>` (off for templates that open <think> in
        the prompt)."""

        def validate(self) -> list[str]:
            problems = super().validate()
            try:
                if self.step_pattern is not None:
                    re.compile(self.step_pattern)
            except re.error as exc:
                problems.append(f"step_pattern: not a valid regular expression ({exc})")
            return problems

    @classmethod
    def transform_examples(cls, examples: list, cfg: "SRL.Config") -> list:
        """SPEC 4.6: each expert solution becomes step-wise instances (problem + steps < k -> step k)."""
        from megahybrid.data.srl import build_srl_dataset

        return build_srl_dataset(examples, first_step=cfg.first_step, pattern=cfg.step_pattern)
