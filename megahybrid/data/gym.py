"""reasoning-gym adapters: Knights-and-Knaves (SASR's KK task) and GSM-symbolic problems as typed records.

Needs the optional `reasoning-gym==0.1.25` package (`pip install 'megahybrid[gym]'`); `megahybrid data make`
writes the records as JSONL that `load_file` reads back.

Knights-and-Knaves: reasoning-gym's config takes one `n_people`, so a people-count range is one dataset per count
(counts split evenly). The answer is reasoning-gym's own text without its final period (`Emma is a knight, and
Liam is a knave`), in the puzzle's own role words; the `kk` reward compares it order-insensitively. The demo tries
the solution and checks every statement against it (truth values from reasoning-gym's evaluator), so it is
deterministic and always consistent. GSM-symbolic: the question, the numeric answer and reasoning-gym's chain of
thought (its `#### N` line dropped) as the demo.
"""
from __future__ import annotations

import random

from megahybrid.data.records import Example

MAX_PEOPLE = 12
"""Our choice: reasoning-gym brute-forces all 2^n assignments of every sampled puzzle (and retries until one has a
unique solution), which is slow beyond a dozen people; SASR uses at most 8."""
_SEED_STRIDE = 2**32
"""reasoning-gym seeds item i with `seed + i`: spacing each (seed, people count) stream this far apart keeps streams
from sharing items (e.g. a train file with seed 0 and a test file with seed 1)."""


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as exc:
        raise ImportError("reasoning-gym tasks need the `reasoning-gym` package "
                          "(pip install 'megahybrid[gym]', or reasoning-gym==0.1.25)") from exc
    return reasoning_gym


def _check(num: int, seed: int) -> None:
    if num < 1:
        raise ValueError(f"num: expected an integer >= 1, got {num}")
    if seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed}")


def _demo(body: str, answer: str) -> str:
    # Same ending as the champ demos: `extract_answer` takes the last \boxed{} after </think>.
    return f"<think>\n{body}\n</think>\nThe answer is \\boxed{{{answer}}}."


def people_counts(num: int, min_people: int, max_people: int) -> list[int]:
    """How many puzzles of each size min_people..max_people: an even split, the remainder to the smaller sizes."""
    if not 2 <= min_people <= max_people <= MAX_PEOPLE:
        # one person: reasoning-gym's answer text is malformed (", and Emma is a knight.")
        raise ValueError(f"people: expected 2 <= min_people <= max_people <= {MAX_PEOPLE}, "
                         f"got {min_people}..{max_people}")
    sizes = max_people - min_people + 1
    return [num // sizes + (i < num % sizes) for i in range(sizes)]


def kk_steps(entry: dict) -> list[str]:
    """One line per person: the statement, its truth value under the solution, and that it fits the speaker."""
    from reasoning_gym.logic.knights_knaves import KKProblemFormatter, KnightsKnavesDataset

    meta = entry["metadata"]
    names, solution, terms = meta["names"], meta["solution"], meta["knight_knave_terms"]
    # The private formatter renders a statement exactly as the question words it (pinned reasoning-gym version).
    fmt = KKProblemFormatter(0, None)
    steps = []
    for name, statement, is_knight in zip(names, meta["statements"], solution):
        holds = bool(KnightsKnavesDataset.test_satisfiability(statement, solution))
        if holds != is_knight:  # a generator invariant; a wrong demo must never reach SFT
            raise AssertionError(f"knights_knaves item {meta['source_index']}: solution contradicts {name}")
        role, does = (terms["a_knight"], "tells the truth") if is_knight else (terms["a_knave"], "lies")
        said = fmt._format_statement(names, terms, statement)
        steps.append(f"{name} is {role} and says: {said}. That is {str(holds).lower()}, so {name} {does}: "
                     "consistent.")
    return steps


def kk_example(entry: dict) -> Example:
    meta = entry["metadata"]
    answer = entry["answer"].rstrip(".")
    steps = kk_steps(entry)
    body = f"Try: {answer}.\n" + "\n".join(steps) + "\nEvery statement fits its speaker, so this is the solution."
    return Example(prompt=entry["question"], answer=answer, demos=[_demo(body, answer)], steps=steps,
                   source="reasoning_gym:knights_knaves",
                   meta={"n_people": len(meta["names"]), "names": [str(n) for n in meta["names"]],
                         "solution": [bool(s) for s in meta["solution"]], "index": meta["source_index"]})


def generate_knights_knaves(num: int, *, min_people: int = 3, max_people: int = 7, seed: int = 0,
                            depth: int = 2, width: int = 2) -> list[Example]:
    """`num` puzzles with min_people..max_people people (reasoning-gym's default depth/width 2), shuffled by seed."""
    _check(num, seed)
    rg = _reasoning_gym()
    out = []
    for n, count in zip(range(min_people, max_people + 1), people_counts(num, min_people, max_people)):
        if count:
            ds = rg.create_dataset("knights_knaves", n_people=n, depth_constraint=depth, width_constraint=width,
                                   size=count, seed=seed * _SEED_STRIDE + n * 2**24)
            out.extend(kk_example(ds[i]) for i in range(count))
    random.Random(f"kk:{seed}").shuffle(out)  # a prefix of the file mixes sizes
    return out


def gsm_example(entry: dict) -> Example:
    answer = str(entry["answer"]).strip()
    lines = [ln.rstrip() for ln in entry["metadata"]["answer_cot"].splitlines()]
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("####")]
    return Example(prompt=entry["question"], answer=answer, demos=[_demo("\n".join(lines), answer)],
                   steps=[ln.strip() for ln in lines], source="reasoning_gym:gsm_symbolic",
                   meta={"index": entry["metadata"]["source_index"]})


def generate_gsm_symbolic(num: int, *, seed: int = 0) -> list[Example]:
    """`num` GSM8K-style template problems (reasoning-gym draws the template per item from the seed)."""
    _check(num, seed)
    ds = _reasoning_gym().create_dataset("gsm_symbolic", size=num, seed=seed * _SEED_STRIDE)
    return [gsm_example(ds[i]) for i in range(num)]


TASKS = ("knights_knaves", "gsm_symbolic")
