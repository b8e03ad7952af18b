"""SPEC 1 and 3 building blocks against the loop re-statements of algo_reference (values and gradients)."""
import math

import pytest
import torch

import algo_reference as ref
from megahybrid.algorithms.losses import (L_MAX, aggregate, clipped_surrogate, demo_surrogate, group_counts,
                                          kl_estimate)

F64 = torch.float64
AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]


def counts(mask):
    """group_counts plus the L_max statistic (= ref.L_MAX) that seq_mean_token_sum_norm divides by."""
    return {**group_counts("g", mask), L_MAX: torch.tensor(float(ref.L_MAX), dtype=F64)}


def rand(seed, *shape, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g, dtype=F64) * scale + shift)


@pytest.mark.parametrize("dual", [None, 3.0])
@pytest.mark.parametrize("low,high", [(0.2, 0.2), (0.2, 0.28)])
def test_clipped_surrogate_matches_loop(dual, low, high):
    logp = rand(0, 5, 7, scale=-2.0).requires_grad_(True)
    old = logp.detach() + rand(1, 5, 7, scale=1.0, shift=-0.5)  # ratios from ~0.6 to ~1.6: all regimes
    adv = rand(2, 5, 1, scale=4.0, shift=-2.0)
    loss, clipped = clipped_surrogate(logp, old, adv, low, high, dual)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    ref_total, ref_clipped = ref.ZERO, torch.zeros(5, 7, dtype=torch.bool)
    for s in range(5):
        for t in range(7):
            value, took = ref.clipped_token(logp[s, t], float(old[s, t]), float(adv[s, 0]), low, high, dual)
            assert float(loss[s, t].detach()) == pytest.approx(float(value.detach()), abs=1e-12)
            ref_total = ref_total + value
            ref_clipped[s, t] = took
    (g_ref,) = torch.autograd.grad(ref_total, logp)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)
    assert torch.equal(clipped, ref_clipped)
    assert 0 < int(clipped.sum()) < clipped.numel()  # the data exercises both branches


def test_dual_clip_bounds_only_negative_advantages():
    logp = torch.tensor([[3.0, 3.0]], dtype=F64)  # ratio e^3 ~ 20
    adv = torch.tensor([[-1.0, 1.0]], dtype=F64)
    loss, _ = clipped_surrogate(logp, torch.zeros_like(logp), adv, 0.2, 0.2, clip_c=3.0)
    assert float(loss[0, 0]) == pytest.approx(3.0)  # -min(20 * -1, 1.2 * -1) = 20, dual-clipped to 3
    assert float(loss[0, 1]) == pytest.approx(-1.2)  # A > 0: ordinary clip


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_loop_and_only_k3_is_clamped(estimator):
    logp = rand(3, 4, 6, scale=-2.0).requires_grad_(True)
    gap = rand(4, 4, 6, scale=24.0, shift=-12.0)  # ref - logp in [-12, 12]: all estimators exceed 10 somewhere
    ref_logp = logp.detach() + gap
    kl = kl_estimate(logp, ref_logp, estimator)
    (g,) = torch.autograd.grad(kl.sum(), logp)
    total = ref.ZERO
    for s in range(4):
        for t in range(6):
            value = ref.kl_token(logp[s, t], float(ref_logp[s, t]), estimator)
            assert float(kl[s, t].detach()) == pytest.approx(float(value.detach()), abs=1e-12)
            total = total + value
    torch.testing.assert_close(g, torch.autograd.grad(total, logp)[0], rtol=0, atol=1e-12)
    if estimator == "k3":
        assert float(kl.detach().max()) == 10.0  # clamped (the data has gaps whose k3 exceeds 10)
    else:
        assert float(kl.detach().abs().max()) > 10.0  # not clamped


def test_demo_surrogate_value_and_gradient():
    logp = rand(5, 3, 4, scale=-3.0).requires_grad_(True)
    adv = rand(6, 3, 1, scale=2.0, shift=-1.0)
    out = demo_surrogate(logp, adv)
    (g,) = torch.autograd.grad(out.sum(), logp)
    for s in range(3):
        for t in range(4):
            p = math.exp(float(logp[s, t].detach()))
            assert float(out[s, t].detach()) == pytest.approx(-float(adv[s, 0]) * p, abs=1e-12)
            assert float(g[s, t]) == pytest.approx(-float(adv[s, 0]) * p, abs=1e-12)


@pytest.mark.parametrize("mode", AGGS)
def test_aggregate_matches_loop_with_empty_sequences(mode):
    values = rand(7, 6, 8, scale=2.0, shift=-1.0).requires_grad_(True)
    mask = rand(8, 6, 8) < 0.5
    mask[2] = False  # an empty sequence is not counted
    out = aggregate(values, mask, mode, counts(mask), "g")
    rows = [[values[s, t] for t in range(8) if mask[s, t]] for s in range(6)]
    expected = ref.aggregate(rows, mode)
    assert float(out.detach()) == pytest.approx(float(expected.detach()), abs=1e-12)
    g, g_ref = (torch.autograd.grad(x, values)[0] for x in (out, expected))
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)
    torch.autograd.gradcheck(lambda v: aggregate(v, mask, mode, counts(mask), "g"), (values,))


@pytest.mark.parametrize("mode", AGGS)
def test_aggregate_of_empty_mask_is_zero_with_finite_zero_gradient(mode):
    values = torch.full((3, 4), float("nan"), dtype=F64, requires_grad=True)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    out = aggregate(values, mask, mode, counts(mask), "g")
    (g,) = torch.autograd.grad(out, values)
    assert float(out.detach()) == 0.0
    assert torch.equal(g, torch.zeros_like(g))


def test_aggregate_rejects_unknown_mode_and_missing_stats():
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="seq_mean_token_mean"):
        aggregate(torch.ones(1, 2), mask, "mean", group_counts("g", mask), "g")
    with pytest.raises(KeyError, match="num_tokens/other"):
        aggregate(torch.ones(1, 2), mask, "token_mean", group_counts("g", mask), "other")


def test_log_ratio_clamp_bounds_the_ratio_and_stops_its_gradient():
    """SPEC 10.A: exp(c(logp - old)) with c = clamp(., -20, 20); where the clamp is active the gradient is 0."""
    logp = torch.tensor([[0.0, -30.0, 25.0, -1.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[-1.0, 0.0, 0.0, -1.0]], dtype=F64)
    adv = torch.ones(1, 1, dtype=F64)
    out, _ = clipped_surrogate(logp, old, adv, 0.2, 0.2, clip=False)
    (g,) = torch.autograd.grad(out.sum(), logp)
    want = [-math.exp(1.0), -math.exp(-20.0), -math.exp(20.0), -1.0]
    torch.testing.assert_close(out.detach()[0], torch.tensor(want, dtype=F64))
    torch.testing.assert_close(g[0], torch.tensor([-math.exp(1.0), 0.0, 0.0, -1.0], dtype=F64))
    ref_lp = torch.tensor([[40.0]], dtype=F64)
    lp = torch.zeros(1, 1, dtype=F64, requires_grad=True)
    k3 = kl_estimate(lp, ref_lp, "k3")
    assert float(k3) == 10.0  # exp(20) - 20 - 1 clamped to 10, not inf
    assert float(torch.autograd.grad(k3.sum(), lp)[0]) == 0.0


def test_clip_false_is_the_bare_ratio_loss_and_never_clips():
    logp = rand(21, 3, 5, scale=-2.0).requires_grad_(True)
    old = logp.detach() + rand(22, 3, 5, scale=1.0, shift=-0.5)
    adv = rand(23, 3, 1, scale=2.0, shift=-1.0)
    out, clipped = clipped_surrogate(logp, old, adv, 0.2, 0.2, 3.0, clip=False)
    (g,) = torch.autograd.grad(out.sum(), logp)
    assert not bool(clipped.any())
    for s in range(3):
        for t in range(5):
            r = math.exp(float(logp[s, t].detach() - old[s, t]))
            assert float(out[s, t].detach()) == pytest.approx(-float(adv[s, 0]) * r, abs=1e-12)
            assert float(g[s, t]) == pytest.approx(-float(adv[s, 0]) * r, abs=1e-12)


@pytest.mark.parametrize("mode", ["none", "dft", "phi"])
def test_sft_token_weight_is_detached(mode):
    from megahybrid.algorithms.losses import sft_token_weight

    logp = rand(24, 2, 3, scale=-3.0).requires_grad_(True)
    w = sft_token_weight(logp, mode)
    loss = -(logp if w is None else w * logp).sum()
    (g,) = torch.autograd.grad(loss, logp)
    for s in range(2):
        for t in range(3):
            p = math.exp(float(logp[s, t].detach()))
            want = {"none": 1.0, "dft": p, "phi": p * (1 - p)}[mode]
            assert float(g[s, t]) == pytest.approx(-want, abs=1e-12)  # d/dlogp of -sg(w) logp is -w
