"""Bundled tasks: arithmetic answers checked by an independent left-to-right evaluator, split disjointness,
determinism; the champ adapter against the raw JSON."""
import json
import re

import pytest

from megahybrid.config.schema import DataConfig
from megahybrid.data import load_dataset
from megahybrid.data.arith import generate_arith
from megahybrid.data.champ import champ_path, load_champ


def evaluate(expr: str) -> tuple[int, list[str]]:
    """Independent reference: tokenise with a regex, fold left to right."""
    toks = re.findall(r"\d+|[+-]", expr)
    value, steps = int(toks[0]), []
    for op, num in zip(toks[1::2], toks[2::2]):
        new = value + int(num) if op == "+" else value - int(num)
        steps.append(f"{value}{op}{num}={new}")
        value = new
    return value, steps


@pytest.mark.parametrize("difficulty, digits", [(1, [2, 1]), (2, [2, 1]), (3, [1, 1, 1]), (4, [2, 2, 2]),
                                                (5, [3, 3, 3])])
def test_arith_problems(difficulty, digits):
    exs = generate_arith(60, difficulty=difficulty, seed=1)
    assert len(exs) == 60
    for ex in exs:
        expr = ex.prompt[:-1]
        assert ex.prompt.endswith("=")
        nums = re.findall(r"\d+", expr)
        assert [len(n) for n in nums] == digits
        if difficulty == 1:
            assert "-" not in expr
        value, steps = evaluate(expr)
        assert ex.answer == str(value) and ex.steps == steps
        assert ex.demos == ["<think>" + "\n".join(steps) + "</think>\\boxed{" + str(value) + "}"]


def test_demo_styles():
    [short] = generate_arith(1, difficulty=3, seed=0)
    [steps] = generate_arith(1, difficulty=3, seed=0, demo_style="steps")
    [boxed] = generate_arith(1, difficulty=3, seed=0, demo_style="boxed")
    assert short.prompt == steps.prompt == boxed.prompt
    a, b = short.steps
    assert steps.demos == [f"<think>\n1. {a}\n2. {b}\n</think>\\boxed{{{short.answer}}}"]
    assert boxed.demos == [f"\\boxed{{{short.answer}}}"]
    with pytest.raises(ValueError, match="demo_style"):
        generate_arith(1, demo_style="long")


@pytest.mark.parametrize("difficulty", [1, 3, 5])
def test_arith_split_disjoint_and_deterministic(difficulty):
    train = generate_arith(500, difficulty=difficulty, seed=7)
    evals = generate_arith(50, difficulty=difficulty, split="eval", seed=7)
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in evals})
    assert len({e.prompt for e in evals}) == len(evals) > 0  # eval problems are distinct
    assert [e.prompt for e in generate_arith(500, difficulty=difficulty, seed=7)] == [e.prompt for e in train]
    assert [e.prompt for e in generate_arith(500, difficulty=difficulty, seed=8)] != [e.prompt for e in train]


def test_difficulty_one_space():
    # 900 problems a+b (a in 10..99, b in 0..9): the eval split holds the hash-selected ones and nothing else
    evals = generate_arith(1000, difficulty=1, split="eval")
    train = generate_arith(20000, difficulty=1, seed=3)
    assert len(evals) + len({e.prompt for e in train}) == 900


def test_champ_matches_raw_json():
    raw = json.loads(champ_path().read_text())["problems"]
    train, evals = load_champ("train"), load_champ("eval")
    assert len(train) + len(evals) == len(raw) == 270 and len(evals) == 54
    ids = [e.meta["id"] for e in train + evals]
    assert len(set(ids)) == 270
    for ex in train[:5] + evals[:5]:
        p = raw[ex.meta["id"]]
        assert ex.prompt == p["_text"] and ex.answer == p["_answer"]
        assert ex.steps == [s["_text"] for s in p["solution"]["steps"]]
        assert ex.demos[0].endswith(f"\\boxed{{{p['_answer']}}}.") and "1. " + ex.steps[0] in ex.demos[0]


def test_load_dataset_builtins():
    cfg = DataConfig(train="builtin:arith_steps", num_train=10, num_eval=5, difficulty=3)
    tr, ev = load_dataset(cfg, "train", seed=1), load_dataset(cfg, "eval", seed=1)
    assert len(tr) == 10 and len(ev) == 5 and tr[0].demos[0].startswith("<think>\n1. ")
    assert tr[0].source == "builtin:arith_steps"
    assert len(load_dataset(DataConfig(train="builtin:champ", num_eval=7), "eval")) == 7
    with pytest.raises(ValueError, match="unknown builtin task 'nope'"):
        load_dataset(DataConfig(train="builtin:nope"), "train")
