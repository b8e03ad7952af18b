"""Every registered method (SPEC 4) against the loop re-statement of algo_reference: loss value and gradients
(w.r.t. logp, entropy and SuperRL's log-sigmas), for every aggregation mode and for the same global batch split
1x4, 2x2 and 4x1 (micro-batches x simulated data-parallel ranks); plus gradcheck and the edge cases of SPEC 9."""
import dataclasses
import math

import pytest
import torch

import algo_reference as ref
from algo_harness import grads, make_algo, make_batch, run_split
from megahybrid.algorithms.base import StepPlan

AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]
SPLITS = [(1, 4, 0), (2, 2, 1), (4, 1, 2)]  # (micro-batches, ranks, padding rows per micro-batch)
SFT_PLAN = StepPlan(step=0, rollouts=False, demos=True, kind="sft")
RL_PLAN = StepPlan(step=20, rollouts=True, demos=False, kind="rl")

CASES = [
    ("sft", {}, None),
    ("sft_kl", {}, None),
    ("sft_kl", {"kl_estimator": "k1", "kl_coef": 0.5}, None),
    ("grpo", {}, None),
    ("grpo", {"clip_ratio_high": 0.28, "clip_ratio_c": 3.0, "tis_cap": 2.0, "kl_coef": 0.05, "entropy_coef": 0.01},
     None),
    ("grpo", {"norm_adv_by_std": False, "kl_coef": 0.1, "kl_estimator": "k2"}, None),
    ("srft", {}, None),
    ("srft", {"entropy_scope": "token"}, None),
    ("srft", {"self_rollout_loss": "reinforce"}, None),
    ("srft", {"self_rollout_loss": "reinforce", "entropy_scope": "token", "kl_coef": 0.1, "entropy_coef": 0.01},
     None),
    ("srft", {"entropy_weights": False, "tis_cap": 1.5, "clip_ratio_c": 2.5}, None),
    ("srft", {"sft_coef_fixed": 1.0, "demo_reward": "one", "kl_coef": 0.05}, None),
    ("srft", {"rl_coef_fixed": 1.0, "sft_coef": 0.7, "rl_coef": 0.2, "entropy_coef": 0.02}, None),
    ("superrl", {}, None),
    ("superrl", {"gate": "advantage", "entropy_coef": 0.01, "tis_cap": 2.0, "kl_estimator": "k1"}, None),
    ("superrl", {"gate": "uncertainty"}, None),
    ("superrl", {"gate": "uncertainty", "kl_coef": 0.0, "clip_ratio_c": 3.0}, None),
    ("sasr", {}, SFT_PLAN),
    ("sasr", {"beta": 0.1, "kl_estimator": "k3"}, RL_PLAN),
    ("srl", {}, None),
]


def reference(name, algo, batch, logp, entropy, plan):
    cfg = ref.with_rollout(algo.cfg, algo.rollout)
    batch = ref.reject_tokens(cfg, batch)
    if name in ("sft", "sft_kl") or (name == "sasr" and plan.kind == "sft"):
        return ref.sft(cfg, batch, logp, cfg.kl_coef if name == "sft_kl" else 0.0)
    if name in ("grpo", "srl", "sasr"):
        return ref.grpo(cfg, batch, logp, entropy, cfg.beta if name == "sasr" else cfg.kl_coef)[0]
    if name == "srft":
        return ref.srft(cfg, batch, logp, entropy)[0]
    if cfg.gate == "uncertainty":
        return ref.superrl_uncertainty(cfg, batch, logp, entropy, *algo.parameters())
    return ref.superrl_gated(cfg, batch, logp, entropy)[0]


def set_log_sigmas(algo, values=(0.3, -0.2)):
    with torch.no_grad():
        for p, v in zip(algo.parameters(), values):
            p.fill_(v)


def check_against_reference(name, overrides, plan, batch, logp, entropy, splits=SPLITS, atol=1e-9):
    algo = make_algo(name, **overrides)
    set_log_sigmas(algo)
    plan = plan or algo.plan(0)
    inputs = [logp, entropy, *algo.parameters()]
    expected = reference(name, algo, batch, logp, entropy, plan)
    expected_grads = grads(expected, inputs)
    for micro, ranks, pad in splits:
        loss, shares, final, _ = run_split(algo, batch, logp, entropy, plan, ranks=ranks, micro=micro, pad=pad)
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), abs=atol), (micro, ranks)
        for got, want in zip(grads(loss, inputs), expected_grads):
            torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=lambda m: f"split {micro}x{ranks}: {m}")
    return algo, shares, final


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("name,overrides,plan", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_method_matches_reference_for_every_split(name, overrides, plan, agg):
    demos = (0,) if plan is RL_PLAN else (1, 0, 2, 1)
    batch, logp, entropy = make_batch(seed=len(overrides) * 10 + len(name), demos=demos,
                                      rewards="float" if "norm_adv_by_std" in overrides else "binary")
    check_against_reference(name, {"loss_agg": agg, **overrides}, plan, batch, logp, entropy)


GRADCHECK = [1, 4, 9, 10, 14, 15, 17, 18]


@pytest.mark.parametrize("name,overrides,plan", [CASES[i] for i in GRADCHECK],
                         ids=[f"{CASES[i][0]}-{i}" for i in GRADCHECK])
def test_gradcheck(name, overrides, plan):
    """Finite differences of the whole pipeline (prepare on 2 ranks, 2 micro-batches each) w.r.t. logp, entropy."""
    batch, logp, entropy = make_batch(seed=3, num_prompts=2, k=2, demos=(1, 2), T=5, empty_prob=0.0)
    algo = make_algo(name, loss_agg="seq_mean_token_mean", **overrides)
    set_log_sigmas(algo)
    plan = plan or algo.plan(0)
    assert torch.autograd.gradcheck(lambda lp, ent: run_split(algo, batch, lp, ent, plan, ranks=2, micro=2)[0],
                                    (logp, entropy))


def test_uncertainty_log_sigma_gradient_is_analytic():
    batch, logp, entropy = make_batch(seed=5)
    algo = make_algo("superrl", gate="uncertainty")
    set_log_sigmas(algo, (0.3, -0.2))
    loss, shares, _, _ = run_split(algo, batch, logp, entropy, ranks=2, micro=2)
    g_pg, g_sft = grads(loss, algo.parameters())
    l_pg = shares["loss/pg"] + shares.get("loss/kl", 0.0)
    l_sft = shares["loss/sft"]
    assert float(g_pg) == pytest.approx(1 - 2 * math.exp(-0.6) * l_pg, abs=1e-10)
    assert float(g_sft) == pytest.approx(1 - 2 * math.exp(0.4) * l_sft, abs=1e-10)


# ---------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("name,overrides,plan", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_empty_masks_give_zero_loss_and_finite_zero_gradient(name, overrides, plan):
    batch, logp, entropy = make_batch(seed=2)
    batch.response_mask[:] = False
    algo = make_algo(name, **overrides)
    plan = plan or algo.plan(0)
    for micro, ranks, pad in SPLITS:
        loss, shares, final, _ = run_split(algo, batch, logp, entropy, plan, ranks=ranks, micro=micro, pad=pad)
        assert float(loss.detach()) == 0.0
        for g in grads(loss, [logp, entropy, *algo.parameters()]):
            assert torch.equal(g, torch.zeros_like(g))
        assert all(math.isfinite(v) for v in [*shares.values(), *final.values()])


@pytest.mark.parametrize("name,overrides", [("grpo", {"kl_coef": 0.05}), ("srl", {}), ("srft", {}),
                                            ("superrl", {"gate": "advantage"}), ("superrl", {})])
def test_all_equal_group_rewards(name, overrides):
    batch, logp, entropy = make_batch(seed=4, rewards="equal")
    algo = check_against_reference(name, overrides, None, batch, logp, entropy)[0]
    prepared, _ = algo.prepare(batch, algo.plan(0))
    assert bool((prepared.fields["adv"] == 0).all())
    if name in ("grpo", "srl"):  # and dynamic sampling drops every group
        assert not bool(make_algo(name, filter_groups=True).keep_sequences(batch).any())


@pytest.mark.parametrize("name,overrides", [("srft", {}), ("srft", {"self_rollout_loss": "reinforce"}),
                                            ("superrl", {}), ("superrl", {"gate": "advantage"}), ("grpo", {})])
def test_no_positive_rollouts(name, overrides):
    batch, logp, entropy = make_batch(seed=6, rewards="nonpositive")
    algo, shares, final = check_against_reference(name, overrides, None, batch, logp, entropy)
    if name == "superrl" and not overrides:  # reward gate: every prompt with demo tokens falls back to SFT
        v = ref.View(batch)
        with_demo = sum(any(v.tokens(s) for s in v.seqs(p, demo=True)) for p in v.prompts())
        assert final["superrl/sft_frac"] == pytest.approx(with_demo / 4) == \
            ref.superrl_gated(algo.cfg, batch, logp, entropy)[1]["superrl/sft_frac"]
        assert final["superrl/no_signal"] == 4 - with_demo and shares["loss/pg"] == 0.0 and with_demo >= 2


@pytest.mark.parametrize("name,overrides", [("srft", {}), ("srft", {"entropy_scope": "token"}), ("superrl", {}),
                                            ("superrl", {"gate": "uncertainty"}), ("sft", {})])
def test_no_demos(name, overrides):
    batch, logp, entropy = make_batch(seed=7, demos=(0,))
    _, shares, final = check_against_reference(name, overrides, None, batch, logp, entropy)
    if name == "superrl" and not overrides:
        expected = ref.superrl_gated(make_algo("superrl").cfg, batch, logp, entropy)[1]
        assert final["superrl/no_signal"] == expected["superrl/no_signal"]
        assert final["superrl/sft_frac"] == 0.0


@pytest.mark.parametrize("gate", ["reward", "advantage"])
@pytest.mark.parametrize("agg", AGGS)
def test_superrl_prompts_without_signal_or_demo_contribute_nothing(gate, agg):
    # prompts 0 and 2 have no demo; without signal (reward gate: no R > 0; advantage gate: all-equal rewards, so
    # A = 0) they route to SFT but have nothing to learn from
    batch, logp, entropy = make_batch(seed=8, demos=(0, 1), rewards="nonpositive" if gate == "reward" else "equal",
                                      empty_prob=0.0)
    algo, shares, final = check_against_reference("superrl", {"gate": gate, "loss_agg": agg}, None, batch, logp,
                                                  entropy)
    expected = ref.superrl_gated(algo.cfg, batch, logp, entropy)[1]
    assert final["superrl/no_signal"] == expected["superrl/no_signal"] == 2.0
    assert final["superrl/sft_frac"] == pytest.approx(expected["superrl/sft_frac"]) == 0.5


@pytest.mark.parametrize("name,overrides", [("srft", {"clip_ratio_c": 3.0}), ("superrl", {"gate": "reward"}),
                                            ("grpo", {"loss_agg": "seq_mean_token_mean", "kl_coef": 0.05})])
def test_very_long_sequences_in_float32(name, overrides):
    """~2k-token responses in float32: the loss matches the float64 loop reference and the gradient matches the
    float64 computation (validated against the reference on small batches above): no accumulation drift."""
    b32, lp32, ent32 = make_batch(seed=9, num_prompts=2, k=2, demos=(1,), T=2048, dtype=torch.float32,
                                  min_response=1500)
    b64 = b32.to(torch.float64)
    lp64, ent64 = (x.detach().double().requires_grad_() for x in (lp32, ent32))
    algo = make_algo(name, dtype=torch.float32, **overrides)
    loss, _, _, _ = run_split(algo, b32, lp32, ent32, ranks=2, micro=2)
    loss64, _, _, _ = run_split(algo, b64, lp64, ent64, ranks=2, micro=2)
    with torch.no_grad():  # the loop reference without autograd keeps this test fast
        expected = reference(name, algo, b64, lp64, ent64, algo.plan(0))
    assert loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert float(loss64.detach()) == pytest.approx(float(expected), rel=1e-12, abs=1e-12)
    for got, want in zip(grads(loss, [lp32, ent32]), grads(loss64, [lp64, ent64])):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-10)


# ---------------------------------------------------------------------------------------------- metric values
def test_metric_values_match_reference():
    batch, logp, entropy = make_batch(seed=11, rewards="binary")
    v = ref.View(batch)
    rollout = [s for s in range(v.S) if not v.demo[s]]
    e = entropy.detach().tolist()
    algo = make_algo("grpo", kl_coef=0.05)
    _, shares, final, _ = run_split(algo, batch, logp, entropy, ranks=2, micro=2)
    assert shares["actor/clip_frac"] == pytest.approx(ref.grpo(algo.cfg, batch, logp, entropy, 0.05)[1]
                                                      ["actor/clip_frac"], abs=1e-12)
    assert shares["entropy/rollout_pos"] == pytest.approx(
        ref.token_group_mean(batch, e, lambda s: not v.demo[s] and v.reward[s] > 0), abs=1e-12)
    assert final["reward/mean"] == pytest.approx(sum(v.reward[s] for s in rollout) / len(rollout))
    assert final["response_length/mean"] == pytest.approx(sum(len(v.tokens(s)) for s in rollout) / len(rollout))
    kl = [[float(ref.kl_token(logp[s, t].detach(), v.ref[s][t], "k3")) if v.mask[s][t] else 0.0
           for t in range(v.T)] for s in range(v.S)]
    assert shares["actor/kl"] == pytest.approx(ref.token_group_mean(batch, kl, lambda s: not v.demo[s]), abs=1e-12)

    algo = make_algo("srft")
    _, shares, final, _ = run_split(algo, batch, logp, entropy, ranks=2, micro=2)
    want = ref.srft(algo.cfg, batch, logp, entropy)[1]
    assert final["srft/w_sft"] == pytest.approx(want["srft/w_sft_batch"], abs=1e-12)
    assert final["srft/w_rl"] == pytest.approx(want["srft/w_rl_batch"], abs=1e-12)
    assert shares["entropy/demo"] == pytest.approx(ref.token_group_mean(batch, e, lambda s: v.demo[s]), abs=1e-12)

    algo = make_algo("srft", entropy_scope="token")
    _, shares, _, _ = run_split(algo, batch, logp, entropy, ranks=2, micro=2)
    w_sft = [[0.5 * math.exp(-h) if h == h else 0.0 for h in row] for row in v.old_h]
    assert shares["srft/w_sft"] == pytest.approx(ref.token_group_mean(batch, w_sft, lambda s: v.demo[s]), abs=1e-12)


def test_srft_demo_reward_one_overwrites_demo_rewards():
    batch, _, _ = make_batch(seed=12, rewards="nonpositive")
    prepared, _ = make_algo("srft", demo_reward="one").prepare(batch, StepPlan(step=0))
    assert bool((prepared.rewards[batch.is_demo] == 1).all())
    assert torch.equal(prepared.rewards[~batch.is_demo], batch.rewards[~batch.is_demo])
    prepared, _ = make_algo("srft").prepare(batch, StepPlan(step=0))
    assert torch.equal(prepared.rewards, batch.rewards)


def test_missing_inputs_raise_clear_errors():
    batch, logp, entropy = make_batch(seed=13)
    batch.old_logp = None
    with pytest.raises(ValueError, match="old_logp"):
        run_split(make_algo("grpo"), batch, logp, entropy)
    batch, logp, entropy = make_batch(seed=13)
    batch.old_entropy = None
    with pytest.raises(ValueError, match="old_entropy"):
        run_split(make_algo("srft"), batch, logp, entropy)
    batch, logp, entropy = make_batch(seed=13)
    batch.ref_logp = None
    with pytest.raises(ValueError, match="ref_logp"):
        run_split(make_algo("sft_kl"), batch, logp, entropy)


SKIPS_OLD_LOGP = [c for c in CASES if c[0] in ("sft", "sft_kl") or c[2] is SFT_PLAN]


@pytest.mark.parametrize("name,overrides,plan", SKIPS_OLD_LOGP, ids=[c[0] for c in SKIPS_OLD_LOGP])
def test_steps_that_skip_the_old_logp_pass_never_read_it(name, overrides, plan):
    """The trainer runs the old-logp pass only where `plan.old_logp` says so (SFT, and SASR's SFT steps skip it):
    such a step must compute the same loss from a batch that has no old_logp / old_entropy at all."""
    algo = make_algo(name, **overrides)
    plan = algo.plan(0)  # SASR: a warm-up step, i.e. SFT
    assert plan.kind == "sft" and not plan.old_logp
    batch, logp, entropy = make_batch(seed=11)
    bare = dataclasses.replace(batch, old_logp=None, old_entropy=None)
    loss_bare = run_split(algo, bare, logp, entropy, plan, ranks=2, micro=2)[0]
    loss_full = run_split(algo, batch, logp, entropy, plan, ranks=2, micro=2)[0]
    assert float(loss_bare.detach()) == pytest.approx(float(loss_full.detach()), abs=1e-12)


def test_sasr_plans_the_old_logp_pass_for_grpo_steps_only():
    algo = make_algo("sasr", schedule="ssr", warmup_steps=2)
    plans = [algo.plan(s) for s in range(6)]
    assert [p.kind for p in plans] == ["sft", "sft", "sft", "rl", "sft", "rl"]
    assert [p.old_logp for p in plans] == [p.kind == "rl" for p in plans]
