"""Bundled arithmetic task: short problems with integer answers, worked demonstrations and a step structure.

Made for tiny models trained from random init on a CPU: problems are a few characters (`3+4=`), demos are
as short as `<think>3+4=7</think>\\boxed{7}`. Difficulty:

    1: a+b            a two-digit, b one-digit (the tiny default: the sum's units digit and carry come from
                      small tables that every training split covers, so held-out problems are learnable)
    2: a+b, a-b       a two-digit, b one-digit
    3: a+b-c ...      three one-digit operands, + and -
    d >= 4            three operands of d-2 digits, + and -

Evaluated left to right; each partial result is one step (`3+4=7`, `7-2=5`). The held-out split is the set of
problems whose SHA-256 falls in one fifth of the hash space, so train and eval never share a problem.
"""
from __future__ import annotations

import hashlib
import itertools
import random

from megahybrid.data.records import Example

DEMO_STYLES = ("short", "steps", "boxed")


def _shape(difficulty: int) -> tuple[tuple[int, ...], str]:
    """(digits of each operand, operators) of a difficulty level."""
    if difficulty < 1:
        raise ValueError(f"data.difficulty: expected an integer >= 1, got {difficulty}")
    if difficulty <= 2:
        return (2, 1), "+" if difficulty == 1 else "+-"
    digits = 1 if difficulty == 3 else difficulty - 2
    return (digits,) * 3, "+-"


def _range(digits: int) -> range:
    return range(0 if digits == 1 else 10 ** (digits - 1), 10**digits)


def is_held_out(expr: str) -> bool:
    """Deterministic split across processes and Python versions (unlike `hash`)."""
    return int.from_bytes(hashlib.sha256(expr.encode()).digest()[:4], "big") % 5 == 0


def solve(numbers: list[int], ops: list[str]) -> tuple[int, list[str]]:
    """Left-to-right value and the steps `a+b=c` that reach it."""
    value, steps = numbers[0], []
    for op, b in zip(ops, numbers[1:]):
        new = value + b if op == "+" else value - b
        steps.append(f"{value}{op}{b}={new}")
        value = new
    return value, steps


def render_demo(steps: list[str], answer: int, style: str) -> str:
    if style == "short":
        return "<think>" + "\n".join(steps) + "</think>\\boxed{" + str(answer) + "}"
    if style == "steps":
        body = "\n".join(f"{i}. {s}" for i, s in enumerate(steps, start=1))
        return "<think>\n" + body + "\n</think>\\boxed{" + str(answer) + "}"
    if style == "boxed":
        return "\\boxed{" + str(answer) + "}"
    raise ValueError(f"demo_style: expected one of {', '.join(DEMO_STYLES)}, got {style!r}")


def make_example(numbers: list[int], ops: list[str], style: str, source: str = "builtin:arith") -> Example:
    expr = str(numbers[0]) + "".join(f"{o}{b}" for o, b in zip(ops, numbers[1:]))
    answer, steps = solve(numbers, ops)
    return Example(prompt=f"{expr}=", answer=str(answer), demos=[render_demo(steps, answer, style)], steps=steps,
                   source=source, meta={"expr": expr})


def _random_problem(rng: random.Random, digits: tuple[int, ...], opset: str) -> tuple[list[int], list[str]]:
    nums = [rng.choice(_range(d)) for d in digits]
    return nums, [rng.choice(opset) for _ in range(len(digits) - 1)]


def _all_problems(digits: tuple[int, ...], opset: str):
    for nums in itertools.product(*(_range(d) for d in digits)):
        for ops in itertools.product(opset, repeat=len(digits) - 1):
            yield list(nums), list(ops)


def generate_arith(num: int, *, difficulty: int = 1, split: str = "train", seed: int = 0,
                   demo_style: str = "short", source: str = "builtin:arith") -> list[Example]:
    """`num` problems of `split` (train: drawn with replacement; eval: distinct, at most the split's size)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split: expected 'train' or 'eval', got {split!r}")
    digits, opset = _shape(difficulty)
    rng = random.Random(f"arith:{seed}:{split}:{difficulty}")
    want_eval = split == "eval"
    space = len(opset) ** (len(digits) - 1)
    for d in digits:
        space *= len(_range(d))
    if space <= 200_000:  # small spaces: enumerate the split exactly
        pool = [p for p in _all_problems(digits, opset)
                if is_held_out(make_example(*p, "boxed").meta["expr"]) == want_eval]
        picks = rng.sample(pool, min(num, len(pool))) if want_eval else rng.choices(pool, k=num)
        return [make_example(n, o, demo_style, source) for n, o in picks]
    out, seen = [], set()
    while len(out) < num:
        ex = make_example(*_random_problem(rng, digits, opset), demo_style, source)
        if is_held_out(ex.meta["expr"]) != want_eval or (want_eval and ex.meta["expr"] in seen):
            continue
        seen.add(ex.meta["expr"])
        out.append(ex)
    return out
