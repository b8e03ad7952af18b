"""SPEC 7: avg@k, pass@1 and unbiased pass@k against exact rational arithmetic with math.comb."""
from fractions import Fraction
from math import comb

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megahybrid.evaluation import avg_at_k, pass_at_1, pass_at_k, pass_at_k_estimate


def exact_pass_at_k(n, c, k):
    return 1 - Fraction(comb(n - c, k), comb(n, k))


def test_pass_at_k_estimate_matches_binomial_formula_exhaustively():
    for n in range(1, 17):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k_estimate(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), abs=1e-12)


def test_large_n_does_not_overflow():
    assert pass_at_k_estimate(1024, 3, 256) == pytest.approx(float(exact_pass_at_k(1024, 3, 256)), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=4, max_size=4), min_size=1, max_size=6), st.integers(1, 4))
def test_dataset_metrics(scores, k):
    n = 4
    assert avg_at_k(scores) == pytest.approx(sum(sum(r) / n for r in scores) / len(scores))
    assert pass_at_1(scores) == pytest.approx(avg_at_k(scores))  # c/n per problem
    want = sum(exact_pass_at_k(n, sum(r), k) for r in scores) / len(scores)
    assert pass_at_k(scores, k) == pytest.approx(float(want), abs=1e-12)


def test_avg_at_k_keeps_fractional_scores_and_pass_counts_positive_rewards():
    scores = [[1.0, 0.5], [0.0, 0.0]]
    assert avg_at_k(scores) == pytest.approx(0.375)
    assert pass_at_k(scores, 2) == pytest.approx(0.5)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k([[1, 0]], 3)
    with pytest.raises(ValueError, match="no samples"):
        avg_at_k([[1], []])
    with pytest.raises(ValueError, match="no problems"):
        pass_at_1([])
