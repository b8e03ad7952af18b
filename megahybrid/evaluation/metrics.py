"""avg@k, pass@1 and unbiased pass@k (SPEC.md section 7; Chen et al. 2021's estimator).

`scores` is one list per problem of its sample scores (1/0 or True/False; a reward > 0 counts as correct for the
pass metrics). avg@k is the mean over problems of the mean score of the problem's samples; pass@1 is the unbiased
pass@k with k = 1, i.e. the mean over problems of c/n (equal to avg@k for 0/1 scores); pass@k averages
`1 - C(n - c, k) / C(n, k)` over problems.
"""
from __future__ import annotations

from typing import Sequence

Scores = Sequence[Sequence[float]]


def _check(scores: Scores) -> None:
    if len(scores) == 0:
        raise ValueError("no problems to score")
    for i, row in enumerate(scores):
        if len(row) == 0:
            raise ValueError(f"problem {i} has no samples")


def avg_at_k(scores: Scores) -> float:
    """Mean over problems of the mean score over that problem's samples."""
    _check(scores)
    return sum(sum(float(s) for s in row) / len(row) for row in scores) / len(scores)


def pass_at_k_estimate(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `n` samples, `c` correct: `1 - C(n - c, k) / C(n, k)`.

    Computed as `1 - prod_{i = n - c + 1}^{n} (1 - k / i)` (no huge binomials)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: need 1 <= k <= n (samples per problem), got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k(scores: Scores, k: int) -> float:
    """Mean over problems of the unbiased pass@k (a sample is correct iff its score > 0)."""
    _check(scores)
    return sum(pass_at_k_estimate(len(row), sum(1 for s in row if float(s) > 0), k) for row in scores) / len(scores)


def pass_at_1(scores: Scores) -> float:
    """Unbiased pass@1: mean over problems of (correct samples / samples)."""
    return pass_at_k(scores, 1)
