"""SuperRL routing (SPEC 4.4) and SASR step choice (SPEC 4.5): property tests, state round-trips."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from algo_harness import make_algo
from megahybrid.algorithms.base import Batch, StepPlan
from megahybrid.algorithms.sasr import adaptive_p, step_uniform

SETTINGS = settings(max_examples=40, deadline=None)


def batch_from_groups(groups):
    """groups: list of (rollout rewards, number of demos); every sequence has 3 response tokens."""
    rows = [(10 * i + 5, False, r) for i, (rs, _) in enumerate(groups) for r in rs]
    rows += [(10 * i + 5, True, 1.0) for i, (_, m) in enumerate(groups) for _ in range(m)]
    S = len(rows)
    mask = torch.zeros(S, 6, dtype=torch.bool)
    mask[:, 2:5] = True
    zeros = torch.zeros(S, 6, dtype=torch.float64)
    return Batch(tokens=torch.zeros(S, 6, dtype=torch.long), response_mask=mask,
                 prompt_index=torch.tensor([p for p, _, _ in rows]), is_demo=torch.tensor([d for _, d, _ in rows]),
                 rewards=torch.tensor([r for _, _, r in rows], dtype=torch.float64), old_logp=zeros,
                 old_entropy=zeros, ref_logp=zeros, engine_logp=zeros)


groups_st = st.lists(st.tuples(st.lists(st.sampled_from([-1.0, 0.0, 0.0, 0.5, 1.0]) | st.floats(-2, 2),
                                        min_size=1, max_size=5),
                               st.integers(0, 2)), min_size=1, max_size=5)


@SETTINGS
@given(groups=groups_st)
def test_superrl_reward_gate_is_one_iff_some_reward_is_positive(groups):
    algo = make_algo("superrl", gate="reward")
    batch, stats = algo.prepare(batch_from_groups(groups), StepPlan(step=0, demos=True))
    for i, (rewards, num_demos) in enumerate(groups):
        sel = batch.prompt_index == 10 * i + 5
        c = any(r > 0 for r in rewards)
        assert bool((batch.fields["superrl/pg"][sel & ~batch.is_demo] == c).all())
        assert bool((batch.fields["superrl/sft"][sel & batch.is_demo] == (not c)).all())
    final = algo.metrics_from_stats(stats)
    num_sft = sum(1 for rs, m in groups if not any(r > 0 for r in rs) and m > 0)
    assert final["superrl/sft_frac"] == pytest.approx(num_sft / len(groups))
    assert final["superrl/no_signal"] == sum(1 for rs, m in groups if not any(r > 0 for r in rs) and m == 0)


@SETTINGS
@given(groups=st.lists(st.tuples(st.lists(st.sampled_from([-1.0, 0.0, 0.25, 0.5, 1.0, 2.0]), min_size=1,
                                          max_size=5), st.integers(0, 2)), min_size=1, max_size=5))
def test_superrl_advantage_gate_is_one_iff_rollout_rewards_differ(groups):
    """max_k A_k > 0 exactly when the rollout rewards are not all equal (demos never count)."""
    algo = make_algo("superrl", gate="advantage")
    batch, _ = algo.prepare(batch_from_groups(groups), StepPlan(step=0, demos=True))
    for i, (rewards, _) in enumerate(groups):
        sel = (batch.prompt_index == 10 * i + 5) & ~batch.is_demo
        assert bool((batch.fields["superrl/pg"][sel] == (len(set(rewards)) > 1)).all())


def test_superrl_log_sigmas_are_parameters_and_round_trip():
    algo = make_algo("superrl", gate="uncertainty", dtype=torch.float32)
    params = algo.parameters()
    assert len(params) == 2 and all(float(p.detach()) == 0.0 and p.requires_grad for p in params)
    with torch.no_grad():
        params[0].fill_(0.25)
        params[1].fill_(-0.5)
    state = algo.state_dict()
    other = make_algo("superrl", gate="uncertainty", dtype=torch.float32)
    kept = other.parameters()
    other.load_state_dict(state)
    assert other.parameters()[0] is kept[0]  # restored in place: an optimizer keeps working
    assert [float(p.detach()) for p in other.parameters()] == [0.25, -0.5]
    with pytest.raises(ValueError, match="s_pg"):
        other.load_state_dict({"s_pg": torch.tensor(1.0)})
    gated = make_algo("superrl")
    assert gated.parameters() == [] and gated.state_dict() == {}


# ---------------------------------------------------------------------------------------------- SASR
def drive(algo, steps, norm_of, start=0):
    """Run the plan/after_step protocol; returns [(kind, p)] per step."""
    out = []
    for step in range(start, steps):
        plan = algo.plan(step)
        assert plan.rollouts == (plan.kind == "rl") and plan.demos == (plan.kind == "sft")
        out.append((plan.kind, plan.metrics["sasr/p"]))
        algo.after_step(plan, norm_of(step))
    return out


@SETTINGS
@given(g_last=st.floats(1e-3, 1e3), g_warmup=st.floats(1e-3, 1e3), gamma=st.floats(0.05, 20),
       factor=st.floats(1.001, 100))
def test_sasr_p_is_in_unit_interval_and_rises_with_sft_grad_norm(g_last, g_warmup, gamma, factor):
    p = adaptive_p(g_last, g_warmup, gamma)
    assert 0 < p < 1
    assert p == pytest.approx(g_last / (g_last + gamma * g_warmup), rel=1e-12)
    assert adaptive_p(g_last * factor, g_warmup, gamma) > p


@SETTINGS
@given(norms=st.lists(st.floats(0.01, 50), min_size=3, max_size=3), gamma=st.floats(0.1, 5))
def test_sasr_adaptive_schedule_follows_algorithm_1(norms, gamma):
    w = 2
    algo = make_algo("sasr", warmup_steps=w, gamma=gamma, seed=7)
    kinds = drive(algo, w, lambda s: norms[s])
    assert kinds == [("sft", 1.0), ("sft", 1.0)]
    assert algo.g_warmup == algo.g_last_sft == norms[w - 1]  # recorded at the last warm-up step
    plan = algo.plan(w)
    assert plan.metrics["sasr/p"] == pytest.approx(1 / (1 + gamma))  # G_last_sft starts at G_warmup
    assert (plan.kind == "sft") == (step_uniform(7, w) < plan.metrics["sasr/p"])
    algo.after_step(StepPlan(step=w, rollouts=False, demos=True, kind="sft"), norms[2])  # an SFT step updates it
    assert algo.plan(w + 1).metrics["sasr/p"] == pytest.approx(norms[2] / (norms[2] + gamma * norms[1]))
    algo.after_step(StepPlan(step=w + 1, kind="rl"), 1e6)  # a GRPO step does not
    assert algo.g_last_sft == norms[2]


def test_sasr_draws_agree_across_ranks_and_match_p():
    ranks = [make_algo("sasr", warmup_steps=1, seed=3) for _ in range(2)]
    runs = [drive(a, 400, lambda s: 1.0) for a in ranks]  # constant norms: p = 1/2 after warm-up
    assert runs[0] == runs[1]
    sft = sum(kind == "sft" for kind, _ in runs[0][1:])
    assert 150 < sft < 250  # Binomial(399, 1/2)
    other = drive(make_algo("sasr", warmup_steps=1, seed=4), 400, lambda s: 1.0)
    assert other != runs[0]
    alphas = [step_uniform(3, s) for s in range(1000)]
    assert all(0 <= a < 1 for a in alphas) and abs(sum(alphas) / 1000 - 0.5) < 0.05


def test_sasr_state_round_trip_gives_identical_later_decisions():
    norm_of = lambda s: 1.0 + 0.7 * math.sin(s) + 0.01 * s  # noqa: E731
    full = make_algo("sasr", warmup_steps=3, gamma=0.8, seed=11)
    first = drive(full, 17, norm_of)
    saved = json.loads(json.dumps(full.state_dict()))  # checkpoints store plain values
    assert saved["step"] == 16 and saved["g_warmup"] == norm_of(2)
    rest = drive(full, 60, norm_of, start=17)
    resumed = make_algo("sasr", warmup_steps=3, gamma=0.8, seed=11)
    resumed.load_state_dict(saved)
    assert drive(resumed, 60, norm_of, start=17) == rest
    assert resumed.state_dict() == full.state_dict()
    assert {kind for kind, _ in first + rest} == {"sft", "rl"}
    assert len({p for _, p in rest}) > 3  # p really moves with the recorded norms
    with pytest.raises(RuntimeError, match="G_warmup"):
        make_algo("sasr", warmup_steps=3, seed=11).plan(17)  # a fresh scheduler cannot pretend
    with pytest.raises(ValueError, match="g_warmup"):
        resumed.load_state_dict({"step": 3})


def test_sasr_ssr_alternates_after_warmup():
    algo = make_algo("sasr", schedule="ssr", warmup_steps=2)
    kinds = [kind for kind, _ in drive(algo, 9, lambda s: 1.0)]
    assert kinds == ["sft", "sft", "sft", "rl", "sft", "rl", "sft", "rl", "sft"]


def test_sasr_ssr_cosine_probability_and_draws():
    upper, lower, total = 0.9, 0.1, 200
    algo = make_algo("sasr", schedule="ssr_cosine", warmup_steps=0, upper=upper, lower=lower, seed=5,
                     total_steps=total)
    for step in range(total):
        plan = algo.plan(step)
        p = 0.5 * (1 + math.cos(math.pi * step / total)) * (upper - lower) + lower
        assert plan.metrics["sasr/p"] == pytest.approx(p, abs=1e-12)
        assert (plan.kind == "sft") == (step_uniform(5, step) < p)
    early = sum(algo.plan(s).kind == "sft" for s in range(50))
    late = sum(algo.plan(s).kind == "sft" for s in range(150, 200))
    assert early > late


def test_sasr_needs_ref_follows_beta():
    assert make_algo("sasr", beta=0.04).needs_ref
    assert not make_algo("sasr", beta=0.0).needs_ref
