"""SRL data (SPEC 4.6): split an expert solution into steps and build step-wise instances.

From N steps, instances k = 2..N (N - 1 of them; `first_step=True` adds k = 1): context = problem + steps
1..k-1, target = step k. The target becomes the instance's `answer`, which the `srl_similarity` reward compares
the model's action with.
"""
from __future__ import annotations

import re

from megahybrid.data.records import Example

STEP_PATTERN = r"^[ \t]*(?:\*\*[ \t]*)?(?:step[ \t]+\d+\b|\d+[.)](?=[\s*]|$))"
"""A line that starts a step: `1.`, `2)`, `Step 3:`, `**Step 4**`, `**5.**` (case-insensitive, multiline)."""


def split_steps(solution: str, pattern: str | None = None) -> list[str]:
    """Steps of `solution`, each stripped, markers kept (the model sees the numbering it must continue).

    Numbered lines matching `pattern` (default STEP_PATTERN) start steps when there are at least two of them;
    text before the first marker stays with the first step. Otherwise: blank-line separated paragraphs.
    """
    rx = re.compile(pattern or STEP_PATTERN, re.IGNORECASE | re.MULTILINE)
    starts = [m.start() for m in rx.finditer(solution)]
    if len(starts) >= 2:
        bounds = [0] + starts[1:] + [len(solution)]
        steps = [solution[a:b].strip() for a, b in zip(bounds[:-1], bounds[1:])]
    else:
        steps = [p.strip() for p in re.split(r"\n[ \t]*\n", solution)]
    return [s for s in steps if s]


def srl_context(problem: str, previous_steps: list[str]) -> str:
    """The prompt of step k: the problem, then the expert's steps 1..k-1, one per line."""
    return "\n".join([problem, *previous_steps])


def build_srl_instances(ex: Example, *, first_step: bool = False, pattern: str | None = None) -> list[Example]:
    """Step-wise instances of one example. Uses `ex.steps`, else splits `ex.demos[0]`; none if it has no steps."""
    steps = ex.steps if ex.steps is not None else (split_steps(ex.demos[0], pattern) if ex.demos else [])
    out = []
    for k in range(1 if first_step else 2, len(steps) + 1):
        out.append(Example(
            prompt=srl_context(ex.prompt, steps[: k - 1]), answer=steps[k - 1], demos=[], steps=None,
            source=ex.source, meta={**ex.meta, "srl_k": k, "srl_num_steps": len(steps), "final_answer": ex.answer},
        ))
    return out


def build_srl_dataset(examples: list[Example], *, first_step: bool = False,
                      pattern: str | None = None) -> list[Example]:
    """All step-wise instances of `examples`, in order."""
    return [inst for ex in examples for inst in build_srl_instances(ex, first_step=first_step, pattern=pattern)]
