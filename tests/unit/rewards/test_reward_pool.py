"""RewardPool: Math-Verify equivalence through the worker processes, adversarial outputs, time limits,
crashes. References are hand-written equivalence tables, not outputs of the code under test."""
import os
import signal
import time

import pytest

from megahybrid.config.schema import RewardConfig
from megahybrid.rewards import RewardPool

pytestmark = pytest.mark.timeout(300)

EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"), ("1/2", "\\frac12"), ("\\dfrac{3}{4}", "0.75"), ("2", "\\frac{4}{2}"),
    ("10", "10.0"), ("1,000", "1000"), ("-3", "-3"), ("50\\%", "0.5"),
    ("\\{1,2\\}", "\\{2,1\\}"), ("(1,2]", "(1, 2]"), ("[0,\\infty)", "[0, \\infty)"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"), ("2\\pi", "2 \\pi"), ("x^2+2x+1", "(x+1)^2"), ("x=3", "3"),
    ("90^\\circ", "90"), ("\\text{(A)}", "A"),
]
NOT_EQUIVALENT = [
    ("4", "5"), ("-1", "1"), ("\\frac{1}{3}", "0.333"), ("[1,2)", "(1,2]"), ("\\{1,2\\}", "\\{1,3\\}"),
    ("\\sqrt{2}", "2"), ("x+1", "x-1"), ("(-\\infty, 3)", "(-\\infty, 3]"), ("a", "b"),
]


@pytest.fixture(scope="module")
def pool():
    p = RewardPool(RewardConfig(name="math", timeout_s=3.0, num_workers=2))
    yield p
    p.close()


def test_equivalence_table(pool):
    gold = [g for g, _ in EQUIVALENT + NOT_EQUIVALENT]
    responses = [f"<think>work</think>The answer is \\boxed{{{p}}}." for _, p in EQUIVALENT + NOT_EQUIVALENT]
    res = pool.score(responses, gold)
    expected = [1.0] * len(EQUIVALENT) + [0.0] * len(NOT_EQUIVALENT)
    wrong = [(g, r) for g, r, s, e in zip(gold, responses, res.scores, expected) if s != e]
    assert not wrong and res.num_timeouts == 0 and res.num_errors == 0


def test_extraction_rules_apply(pool):
    res = pool.score(["<think>\\boxed{7}</think> so 8", "<think>x</think> 0.50 then \\boxed{1/2}", "no answer"],
                     ["7", "\\frac{1}{2}", "0"])
    assert res.scores == [0.0, 1.0, 0.0]


def test_adversarial_outputs_score_zero_and_execute_nothing(pool, tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        f"\\boxed{{__import__('os').system('touch {marker}')}}",
        f"<think>x</think>\\boxed{{eval(\"open('{marker}', 'w')\")}}",
        f"\\boxed{{$(touch {marker})}}",
        "\\boxed{10^{10^{10^{10}}}}",
        "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}",
        "a" * 10_000_000,
        "1" * 10_000_000,
    ]
    t0 = time.monotonic()
    res = pool.score(payloads, ["5"] * len(payloads))
    elapsed = time.monotonic() - t0
    assert res.scores == [0.0] * len(payloads)
    assert not marker.exists()
    assert res.num_timeouts >= 1  # the tower of powers is stuck in C big-integer code until the pool kills it
    # liveness, not speed: every check is bounded by timeout + grace, plus a worker restart per kill
    assert elapsed < len(payloads) * (3.0 + 2.0) + 60
    assert pool.score(["\\boxed{5}"], ["5"]).scores == [1.0]  # the pool still works afterwards


def test_python_level_timeout_is_counted():
    # a timer-interruptible slow check: SequenceMatcher on long strings over a large alphabet (no character is
    # frequent enough for difflib's autojunk heuristic to skip it), i.e. pure-Python quadratic work
    with RewardPool(RewardConfig(name="srl_similarity", timeout_s=0.5, num_workers=1)) as p:
        long_a = "<think>t</think>" + "".join(chr(0x4E00 + (i * 7919) % 5000) for i in range(100_000))
        long_b = "".join(chr(0x4E00 + (i * 104729) % 5003) for i in range(100_000))
        res = p.score([long_a, "<think>t</think>abcd"], [long_b, "abce"])
        assert res.scores[0] == 0.0 and res.num_timeouts == 1 and res.scores[1] == pytest.approx(0.75)
        assert res.metrics()["reward/timeouts"] == 1.0
        assert p.num_restarts == 0  # the worker's own timer stopped it: no kill needed


def test_crashed_worker_is_restarted_and_check_retried(pool):
    restarts = pool.num_restarts
    for pid in pool.pids():
        os.kill(pid, signal.SIGKILL)
    res = pool.score(["\\boxed{3}", "\\boxed{\\frac{6}{2}}", "\\boxed{4}"], ["3", "3", "3"])
    assert res.scores == [1.0, 1.0, 0.0] and res.num_errors == 0
    assert pool.num_restarts >= restarts + 2


def test_worker_killed_while_starting_is_started_again(capfd):
    with RewardPool(RewardConfig(name="math", timeout_s=3.0, num_workers=1)) as p:
        pid = p.pids()[0]
        os.kill(pid, signal.SIGKILL)  # still importing Math-Verify: it never said "ready"
        assert p.score(["\\boxed{3}"], ["3"]).scores == [1.0]
        assert p.num_restarts == 1
    assert f"reward worker (pid {pid}) was killed by SIGKILL while starting; starting another" in capfd.readouterr().err


def test_exact_in_process_and_format_coef():
    with RewardPool(RewardConfig(name="exact", format_coef=0.5)) as p:
        assert p.pids() == []  # no worker processes for the in-process reward
        res = p.score(["<think>3+4=7</think>\\boxed{7}", "\\boxed{7}", "<think>x</think>\\boxed{8}"], ["7"] * 3)
        assert res.format_scores == [1.0, 0.0, 1.0]
        assert res.scores == [1.5, 1.0, 0.5]


def test_bad_arguments():
    with pytest.raises(ValueError, match="reward.name"):
        RewardPool(RewardConfig(name="bleu"))
    with RewardPool(RewardConfig(name="exact")) as p, pytest.raises(ValueError, match="2 responses but 1"):
        p.score(["a", "b"], ["a"])
