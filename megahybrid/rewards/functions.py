"""The reward functions (SPEC 4.6, 6). `math` and `srl_similarity` run in RewardPool's worker processes; `exact`,
`kk` and `format` are linear-time string checks that are safe to run in-process.

Model text is data: it reaches Math-Verify's LaTeX parser (which builds SymPy objects from a grammar), never
`eval`, `exec`, `sympify`/`parse_expr` of raw strings, or a shell.
"""
from __future__ import annotations

import difflib
import re

from megahybrid.rewards.extract import extract_action, extract_answer, has_think_block

MAX_ANSWER_CHARS = 4096
"""Longer extracted answers are not parsed (score 0): no ground truth is that long."""
_INT = re.compile(r"-?\d{1,64}")
REWARD_NAMES = ("math", "srl_similarity", "exact", "kk")
"""Every `reward.name` / `reward.eval_name` (config/schema.py spells the same choices as a Literal)."""
KK_ROLES = frozenset({"knight", "knave", "pioneer", "laggard", "saint", "sinner", "hero", "villain", "angel", "devil",
                      "altruist", "egoist", "sage", "fool"})
"""Role words of reasoning-gym 0.1.25's knights_knaves puzzles (its KNIGHT_KNAVE_PAIRS; a test checks they agree)."""
_KK_FILLER = frozenset({"is", "a", "an", "and"})
_KK_PUNCT = str.maketrans({c: " " for c in ".,;:!\"()"})


def _latex(answer: str):
    # LaTeX extraction only: Math-Verify's ExprExtractionConfig runs sympy.parse_expr, which evaluates Python.
    # Internal signal.alarm timeouts are off (None): the worker's own timer covers the whole check.
    from math_verify import LatexExtractionConfig, parse

    return parse("\\boxed{" + answer + "}", extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
                 parsing_timeout=None)


def math_equal(pred: str, gold: str) -> bool:
    """Symbolic/numeric equivalence of two answers (Math-Verify), with a plain-integer fast path."""
    pred, gold = pred.strip(), gold.strip()
    if pred == gold:
        return True
    if _INT.fullmatch(pred) and _INT.fullmatch(gold):
        return int(pred) == int(gold)
    if len(pred) > MAX_ANSWER_CHARS:
        return False
    from math_verify import verify

    return bool(verify(_latex(gold), _latex(pred), timeout_seconds=None))


def math_reward(response: str, reference: str) -> float:
    """1 if the extracted answer is equivalent to the reference, else 0."""
    answer = extract_answer(response)
    return float(answer is not None and math_equal(answer, reference))


def exact_reward(response: str, reference: str) -> float:
    """1 if the extracted answer equals the reference as a string (spaces ignored) or as an integer. No SymPy."""
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    a, b = answer.replace(" ", ""), reference.strip().replace(" ", "")
    if _INT.fullmatch(a) and _INT.fullmatch(b):
        return float(int(a) == int(b))
    return float(a == b)


def kk_assignment(text: str) -> dict[str, str] | None:
    """`Emma is a knight, and Liam is a knave` -> {"emma": "knight", "liam": "knave"} (case, punctuation, `is`,
    `a`/`an` and `and` ignored); None unless the rest alternates name, role word with each name once."""
    if len(text) > MAX_ANSWER_CHARS:
        return None
    words = [w for w in text.lower().translate(_KK_PUNCT).split() if w not in _KK_FILLER]
    if not words or len(words) % 2:
        return None
    out: dict[str, str] = {}
    for name, role in zip(words[::2], words[1::2]):
        if name in KK_ROLES or role not in KK_ROLES or name in out:
            return None
        out[name] = role
    return out


def kk_reward(response: str, reference: str) -> float:
    """Knights-and-Knaves: 1 if the extracted answer assigns every reference person the reference role (any order),
    else 0 (a malformed answer included). Like reasoning-gym's scorer at 1.0, without its partial credit."""
    answer = extract_answer(response)
    got = None if answer is None else kk_assignment(answer)
    return float(got is not None and got == kk_assignment(reference))


def srl_similarity(response: str, expert_step: str, *, require_think: bool = True) -> float:
    """SPEC 4.6: difflib ratio (2M/T) of the action vs the expert step; -1 for a bad format or empty action."""
    action = extract_action(response, require_think=require_think)
    if action is None:
        return -1.0
    # SPEC 9: the expert step is stripped too, whether the splitter made it or a data file's `steps` held it
    return difflib.SequenceMatcher(None, action, expert_step.strip()).ratio()


def format_reward(response: str, *, opened_in_prompt: bool = False) -> float:
    """1 for a well-formed `<think>...</think>` block followed by an answer, else 0."""
    return float(has_think_block(response, opened_in_prompt=opened_in_prompt))


def run_check(name: str, response: str, reference: str, opts: dict) -> float:
    """Dispatch used by the worker process."""
    if name == "math":
        return math_reward(response, reference)
    if name == "srl_similarity":
        return srl_similarity(response, reference, require_think=opts.get("require_think", True))
    if name == "exact":
        return exact_reward(response, reference)
    if name == "kk":
        return kk_reward(response, reference)
    raise ValueError(f"reward.name: expected one of {', '.join(REWARD_NAMES)}, got {name!r}")
