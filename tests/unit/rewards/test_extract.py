"""Answer / action extraction and the format check (SPEC 6, 9), on hand-written cases."""
import pytest

from megahybrid.rewards.extract import extract_action, extract_answer, has_think_block, last_boxed
from megahybrid.rewards.functions import exact_reward, format_reward, srl_similarity


@pytest.mark.parametrize("text, answer", [
    ("<think>maybe \\boxed{3}</think> so \\boxed{4}", "4"),                # boxed inside think never counts
    ("<think>\\boxed{3}</think> the answer is 12, no 13.5", "13.5"),       # fallback: last number after </think>
    ("<think>a</think>b</think> \\boxed{7} ", "7"),                         # after the FINAL </think>
    ("no think \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),     # whole text when no </think>
    ("\\boxed{ \\{1, 2\\} }", "\\{1, 2\\}"),
    ("\\boxed{a{b}c} and \\boxed{d{e", "a{b}c"),                            # unbalanced last box: previous one
    ("\\boxed {5}", "5"),
    ("x = -3.25 or 4", "4"),
    ("minus -7", "-7"),
    ("<think>42</think> no answer here", None),
    ("", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_nested_and_huge_inputs_are_linear():
    deep = "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}"
    assert last_boxed(deep) == "{" * 100_000 + "1" + "}" * 100_000
    assert extract_answer("\\boxed{" * 200_000) is None
    assert extract_answer("a" * 10_000_000) is None


def test_text_outside_the_answer_never_counts():
    assert exact_reward("<think>the answer is 5</think>\\boxed{6}", "5") == 0.0
    assert exact_reward("5 is wrong, \\boxed{6}", "6") == 1.0
    assert exact_reward("\\boxed{ 1 2 }", "12") == 1.0 and exact_reward("\\boxed{012}", "12") == 1.0
    assert exact_reward("nothing", "0") == 0.0


@pytest.mark.parametrize("text, require_think, action", [
    ("<think>plan</think>  x = 2  ", True, "x = 2"),
    ("<think>a</think>b<think>c</think> last", True, "last"),
    ("plan</think> act", True, None),          # no <think> before the last </think>
    ("plan</think> act", False, "act"),        # switched off: chat template opened <think> in the prompt
    ("<think>plan</think>   ", True, None),    # empty action
    ("<think>unclosed", True, None),
])
def test_extract_action(text, require_think, action):
    assert extract_action(text, require_think=require_think) == action


def test_srl_similarity_values():
    # SequenceMatcher ratio = 2M/T: "abcd" vs "abce": M=3, T=8
    assert srl_similarity("<think>t</think>abcd", "abce") == pytest.approx(0.75)
    assert srl_similarity("<think>t</think>same step", "same step") == 1.0
    assert srl_similarity("<think>t</think>xyz", "abc") == 0.0
    assert srl_similarity("no think block", "abc") == -1.0
    assert srl_similarity("<think>t</think>", "abc") == -1.0
    assert srl_similarity("t</think> ab", "abcd", require_think=False) == pytest.approx(2 * 2 / 6)


@pytest.mark.parametrize("text, opened, ok", [
    ("<think>reason</think>\\boxed{1}", False, True),
    ("  <think>\nreason\n</think>\nanswer", False, True),
    ("<think>reason</think>", False, False),                  # nothing after the block
    ("answer <think>reason</think> x", False, False),         # block not at the start
    ("<think>a</think><think>b</think> x", False, False),     # two blocks
    ("<think>a <think> b</think> x", False, False),
    ("reason</think> x", True, True),                          # prompt ended with <think>
    ("<think>reason</think> x", True, False),
])
def test_format(text, opened, ok):
    assert has_think_block(text, opened_in_prompt=opened) is ok
    assert format_reward(text, opened_in_prompt=opened) == float(ok)
