"""reasoning-gym adapters: KK people counts, determinism, worked demos that check every statement, GSM-symbolic
records, the JSONL writer round-trip through the project's loader, and `megahybrid data make`."""
import dataclasses
import os
import re
from collections import Counter

import pytest
import reasoning_gym

from megahybrid.cli import main
from megahybrid.data.gym import generate_gsm_symbolic, generate_knights_knaves, people_counts
from megahybrid.data.loaders import load_file, write_jsonl
from megahybrid.rewards.extract import extract_answer, has_think_block
from megahybrid.rewards.functions import exact_reward, kk_reward


@pytest.fixture(scope="module")
def kk():
    return generate_knights_knaves(13, min_people=2, max_people=4, seed=3)


def test_kk_people_counts_in_range_and_split_evenly(kk):
    counts = Counter(ex.meta["n_people"] for ex in kk)
    assert counts == {2: 5, 3: 4, 4: 4} and people_counts(13, 2, 4) == [5, 4, 4]
    for ex in kk:
        n = ex.meta["n_people"]
        assert f"You meet {n} inhabitants" in ex.prompt
        assert len(ex.meta["names"]) == len(ex.meta["solution"]) == len(ex.steps) == n
    assert len({ex.prompt for ex in kk}) == len(kk)


@pytest.mark.parametrize("low, high", [(1, 3), (4, 3), (2, 13)])
def test_kk_bad_people_range(low, high):
    with pytest.raises(ValueError, match="min_people <= max_people"):
        people_counts(10, low, high)


def test_kk_deterministic_for_a_seed(kk):
    again = generate_knights_knaves(13, min_people=2, max_people=4, seed=3)
    assert [dataclasses.asdict(e) for e in again] == [dataclasses.asdict(e) for e in kk]
    other = generate_knights_knaves(13, min_people=2, max_people=4, seed=4)
    assert not {e.prompt for e in other} & {e.prompt for e in kk}


def test_kk_demo_checks_every_statement_and_boxes_the_answer(kk):
    for ex in kk:
        [demo] = ex.demos
        assert has_think_block(demo)
        assert extract_answer(demo) == ex.answer and kk_reward(demo, ex.answer) == 1.0
        for name, is_knight, step in zip(ex.meta["names"], ex.meta["solution"], ex.steps):
            assert step.startswith(f"{name} is ") and step in demo
            # the statement's truth value equals the speaker's honesty (the demo's consistency claim)
            assert f"That is {'true' if is_knight else 'false'}, so {name} " in step


def test_kk_answer_lists_each_person_in_the_prompt_order(kk):
    for ex in kk:
        said = re.findall(r"(\w+) is an? (\w+)", ex.answer)
        assert [n for n, _ in said] == ex.meta["names"]
        assert ex.answer.endswith(said[-1][1])  # canonical: no trailing period


def test_gsm_symbolic_records():
    exs = generate_gsm_symbolic(6, seed=2)
    ds = reasoning_gym.create_dataset("gsm_symbolic", size=6, seed=2 * 2**32)
    assert [dataclasses.asdict(e) for e in exs] == [dataclasses.asdict(e) for e in generate_gsm_symbolic(6, seed=2)]
    for ex, entry in zip(exs, ds):
        assert ex.prompt == entry["question"] and ex.answer == entry["answer"]
        assert re.fullmatch(r"-?\d+(\.\d+)?", ex.answer)
        [demo] = ex.demos
        assert exact_reward(demo, ex.answer) == 1.0 and ds.score_answer(extract_answer(demo), entry) == 1.0
        assert ex.steps and not any("####" in s for s in ex.steps)
        assert all(s in demo for s in ex.steps)


def test_jsonl_round_trip_through_the_loader(tmp_path, kk):
    exs = kk + generate_gsm_symbolic(3, seed=0)
    path = str(tmp_path / "sub" / "kk.jsonl")
    assert write_jsonl(exs, path) == len(exs)
    loaded = [dataclasses.replace(e, location="") for e in load_file(path)]  # where each row was read is new
    assert [dataclasses.asdict(e) for e in loaded] == [dataclasses.asdict(e) for e in exs]


def test_writer_failure_keeps_the_old_file(tmp_path, kk):
    path = tmp_path / "kk.jsonl"
    path.write_text("old\n")

    def rows():
        yield kk[0]
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError, match="generator failed"):
        write_jsonl(rows(), str(path))
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["kk.jsonl"]


def test_cli_data_make_writes_a_loadable_file(tmp_path, capsys):
    out = tmp_path / "knights_knaves" / "train.jsonl"
    rc = main(["data", "make", "knights_knaves", "--out", str(out), "--num", "4", "--min-people", "2",
               "--max-people", "3", "--seed", "5"])
    assert rc == 0 and "wrote 4 knights_knaves records" in capsys.readouterr().err
    exs = load_file(str(out))
    assert [e.prompt for e in exs] == [e.prompt for e in generate_knights_knaves(4, min_people=2, max_people=3,
                                                                                seed=5)]
    assert sorted(e.meta["n_people"] for e in exs) == [2, 2, 3, 3]


@pytest.mark.parametrize("args, message", [
    (["--num", "0"], "argument --num: expected an integer >= 1, got 0"),
    (["--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    (["--min-people", "1"], "argument --min-people: expected an integer in 2..12, got 1"),
    (["--max-people", "13"], "argument --max-people: expected an integer in 2..12, got 13"),
    (["--num", "ten"], "argument --num: expected an integer, got 'ten'"),
])
def test_cli_data_make_rejects_bad_values(tmp_path, capsys, args, message):
    out = tmp_path / "x.jsonl"
    with pytest.raises(SystemExit) as exc:
        main(["data", "make", "knights_knaves", "--out", str(out), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("task, args, message", [
    ("knights_knaves", ["--min-people", "5", "--max-people", "3"], "--min-people 5 is above --max-people 3"),
    ("gsm_symbolic", ["--max-people", "3"], "--min-people/--max-people apply to knights_knaves, not gsm_symbolic"),
])
def test_cli_data_make_rejects_inconsistent_options(tmp_path, capsys, task, args, message):
    out = tmp_path / "x.jsonl"
    assert main(["data", "make", task, "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err and not out.exists()
