"""The `kk` reward: order-insensitive name/role assignments, 0 for anything malformed, and agreement at 1.0 with
reasoning-gym's own knights_knaves scorer on its generated puzzles."""
import random
import time
import typing

import pytest
import reasoning_gym
from reasoning_gym.logic.knights_knaves import VALID_ROLES

from megahybrid.config.schema import RewardConfig
from megahybrid.data.gym import kk_example
from megahybrid.rewards.functions import KK_ROLES, REWARD_NAMES, kk_assignment, kk_reward, run_check
from megahybrid.rewards.pool import RewardPool

REF = "Emma is a knight, Liam is a knave, and Ava is a knight"


@pytest.mark.parametrize("response, score", [
    (f"<think>t</think>The answer is \\boxed{{{REF}}}.", 1.0),
    ("\\boxed{Ava is a knight, Emma is a knight, and Liam is a knave}", 1.0),    # any order
    ("\\boxed{emma: KNIGHT; liam: knave; ava: knight}", 1.0),                      # case, punctuation
    ("\\boxed{Emma is a knight, Liam is a knight, and Ava is a knight}", 0.0),    # one role flipped
    ("\\boxed{Emma is a knight, and Liam is a knave}", 0.0),                       # a person missing
    (f"\\boxed{{{REF}, and Noah is a knave}}", 0.0),                               # an extra person
    ("\\boxed{Emma is a knight, Emma is a knave, Liam is a knave, Ava is a knight}", 0.0),  # named twice
    ("\\boxed{Emma is a saint, Liam is a sinner, and Ava is a saint}", 0.0),      # the puzzle's words only
    ("\\boxed{Emma is not a knave, Liam is a knave, and Ava is a knight}", 0.0),  # not name/role pairs
    (f"<think>\\boxed{{{REF}}}</think> no box after thinking", 0.0),
    ("\\boxed{}", 0.0),
    ("\\boxed{knight knave knight knave}", 0.0),
    ("", 0.0),
])
def test_kk_reward_cases(response, score):
    assert kk_reward(response, REF) == score
    assert run_check("kk", response, REF, {}) == score


def test_malformed_reference_scores_0():
    assert kk_reward("\\boxed{Emma is}", "Emma is") == 0.0


def test_huge_input_is_linear_and_scores_0():
    start = time.perf_counter()
    assert kk_assignment("Emma is a knight, " * 1_000_000) is None
    assert kk_reward("\\boxed{" + "Emma is a knight " * 1_000_000 + "}", REF) == 0.0
    assert time.perf_counter() - start < 2.0


def test_role_words_match_reasoning_gym():
    assert KK_ROLES == VALID_ROLES


def test_reward_names_match_the_config_choices():
    hints = typing.get_type_hints(RewardConfig)
    assert set(typing.get_args(hints["name"])) == set(REWARD_NAMES)
    literal, none = typing.get_args(hints["eval_name"])  # Literal[...] | None
    assert set(typing.get_args(literal)) == set(REWARD_NAMES) and none is type(None)


def variants(entry: dict, rng: random.Random) -> list[str]:
    """reasoning-gym's answer, a reordering, one role flipped, and garbage."""
    meta = entry["metadata"]
    terms = meta["knight_knave_terms"]
    said = [f"{n} is {terms['a_knight'] if k else terms['a_knave']}" for n, k in zip(meta["names"], meta["solution"])]
    shuffled = rng.sample(said, len(said))
    flip = rng.randrange(len(said))
    flipped = [f"{n} is {terms['a_knave'] if k else terms['a_knight']}" if i == flip else s
               for i, (n, k, s) in enumerate(zip(meta["names"], meta["solution"], said))]
    return [entry["answer"], ", ".join(shuffled), " and ".join(flipped), "I do not know", meta["names"][0]]


@pytest.mark.parametrize("n_people", [2, 3, 5])
def test_agrees_with_reasoning_gym_scorer(n_people):
    ds = reasoning_gym.create_dataset("knights_knaves", n_people=n_people, size=8, seed=11)
    rng = random.Random(n_people)
    for entry in ds:
        ex = kk_example(entry)
        assert ds.score_answer(ex.answer, entry) == 1.0
        scores = []
        for text in variants(entry, rng):
            ours = kk_reward(f"<think>x</think>\\boxed{{{text}}}", ex.answer)
            assert ours == float(ds.score_answer(text, entry) == 1.0), text
            scores.append(ours)
        assert scores == [1.0, 1.0, 0.0, 0.0, 0.0]  # the variants are what they claim to be


def test_reward_pool_scores_kk_in_process():
    with RewardPool(RewardConfig(name="kk")) as pool:
        assert pool.pids() == []  # a linear string check: no worker processes
        result = pool.score([f"\\boxed{{{REF}}}", "\\boxed{Emma is a knave}"], [REF, REF])
    assert result.scores == [1.0, 0.0]
