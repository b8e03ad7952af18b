"""The reward functions (SPEC 4.6, 6). `math` and `srl_similarity` run in RewardPool's worker processes; `exact`
and `format` are linear-time string checks that are safe to run in-process.

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


def srl_similarity(response: str, expert_step: str, *, require_think: bool = True) -> float:
    """SPEC 4.6: difflib ratio (2M/T) of the action vs the expert step; -1 for a bad format or empty action."""
    action = extract_action(response, require_think=require_think)
    if action is None:
        return -1.0
    return difflib.SequenceMatcher(None, action, expert_step).ratio()


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
    raise ValueError(f"reward.name: expected math, srl_similarity or exact, got {name!r}")
