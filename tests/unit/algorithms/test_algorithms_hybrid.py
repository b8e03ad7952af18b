"""SPEC 10.C methods (luffy, chord, hpt, dft) against the loop re-statements of algo_reference_hybrid: loss values
and gradients for every aggregation mode and the 1x4 / 2x2 / 4x1 splits, their sequence selection, schedules and
routing metrics, and the edge cases of the existing method tests."""
import math

import pytest
import torch

import algo_reference as ref
import algo_reference_hybrid as hyb
from algo_harness import grads, make_algo, make_batch, run_split
from test_algorithms_methods import SPLITS

AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]


def expected_loss(name, algo, batch, logp, entropy, step):
    cfg = ref.with_rollout(algo.cfg, algo.rollout)
    if name == "luffy":
        return hyb.luffy(cfg, batch, logp, entropy)
    if name == "hpt":
        return hyb.hpt(cfg, batch, logp, entropy)[0]
    if name == "chord":
        return hyb.chord(cfg, batch, logp, entropy, step)[0]
    assert name == "dft"
    return ref.sft(cfg, batch, logp)


def check(name, overrides, batch, logp, entropy, step=0, atol=1e-9, rollout=None):
    algo = make_algo(name, rollout=rollout, **overrides)
    keep = algo.keep_sequences(batch)
    batch, logp, entropy = batch.select(keep), logp[keep], entropy[keep]  # what the trainer trains on
    plan = algo.plan(step)
    want = expected_loss(name, algo, batch, logp, entropy, step)
    want_g = grads(want, [logp, entropy])
    out = None
    for micro, ranks, pad in SPLITS:
        out = run_split(algo, batch, logp, entropy, plan, ranks=ranks, micro=micro, pad=pad)
        assert float(out[0].detach()) == pytest.approx(float(want.detach()), abs=atol), (micro, ranks)
        for got, exp in zip(grads(out[0], [logp, entropy]), want_g):
            torch.testing.assert_close(got, exp, rtol=0, atol=atol)
    return algo, batch, out


CASES = [
    ("luffy", {}), ("luffy", {"norm_adv_by_std": True, "adv_group": "rollouts", "clip": True}),
    ("luffy", {"gamma": None, "n_demos": 2, "entropy_coef": 0.0}),
    ("hpt", {}), ("hpt", {"gate": 1, "sft_coef": 0.3, "sft_weight": "phi", "clip": True, "clip_ratio_c": 3.0}),
    ("hpt", {"kl_coef": 0.05, "norm_adv_by_std": True}),
    ("chord", {}), ("chord", {"phi": False, "cutoff_prob": 0.3, "token_level_sft": False, "kl_coef": 0.1}),
    ("dft", {}), ("dft", {"sft_weight": "phi"}),
]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("name,overrides", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_reference_for_every_split(name, overrides, agg):
    batch, logp, entropy = make_batch(seed=40 + len(overrides), k=4, demos=(1, 0, 2, 1),
                                      rewards="float" if overrides.get("norm_adv_by_std") else "binary")
    check(name, {"loss_agg": agg, **overrides}, batch, logp, entropy, step=3)


@pytest.mark.parametrize("name", ["luffy", "hpt", "chord"])
def test_rollout_correction_applies_to_rollout_tokens_only(name):
    batch, logp, entropy = make_batch(seed=41, k=4)
    check(name, {}, batch, logp, entropy, rollout={"correction": "icepop", "mask_lo": 0.8, "mask_hi": 1.25})
    check(name, {}, batch, logp, entropy, rollout={"correction": "seq_tis", "is_cap": 1.3})


@pytest.mark.parametrize("name", ["luffy", "hpt", "chord", "dft"])
def test_empty_masks_give_zero_loss_and_finite_zero_gradient(name):
    batch, logp, entropy = make_batch(seed=42, k=4)
    batch.response_mask[:] = False
    algo = make_algo(name)
    for micro, ranks, pad in SPLITS:
        loss, shares, final, _ = run_split(algo, batch, logp, entropy, algo.plan(0), ranks=ranks, micro=micro,
                                           pad=pad)
        assert float(loss.detach()) == 0.0
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads(loss, [logp, entropy]))
        assert all(math.isfinite(v) for v in [*shares.values(), *final.values()])


@pytest.mark.parametrize("rewards", ["equal", "nonpositive"])
@pytest.mark.parametrize("name", ["luffy", "hpt", "chord"])
def test_all_equal_and_no_positive_groups(name, rewards):
    batch, logp, entropy = make_batch(seed=43, k=4, rewards=rewards)
    check(name, {}, batch, logp, entropy)


def test_luffy_keeps_n_minus_m_rollouts_and_m_demos():
    batch, _, _ = make_batch(seed=44, k=5, demos=(1, 0, 3, 2))
    for m in (1, 2):
        keep = make_algo("luffy", n_demos=m).keep_sequences(batch)
        v = ref.View(batch)
        for p in v.prompts():
            rolls, demos = v.seqs(p, demo=False), v.seqs(p, demo=True)
            d = min(m, len(demos))
            assert [s for s in rolls if keep[s]] == rolls[:5 - d]  # the first rollouts, in batch order
            assert [s for s in demos if keep[s]] == demos[:d]


def test_chord_expert_share_and_mu_schedule():
    batch, _, _ = make_batch(seed=45, k=4, demos=(3, 3, 3, 3))
    keep = make_algo("chord").keep_sequences(batch)
    assert int((keep & batch.is_demo).sum()) == math.ceil(0.2 / 0.8 * 16) == 4
    algo = make_algo("chord", mu_warmup_steps=3, mu_decay_steps=5, mu_peak=0.9, mu_valley=0.05)
    mus = [algo.plan(s).metrics["chord/mu"] for s in range(12)]
    assert mus == pytest.approx([hyb.chord_mu(s, 3, 5, 0.9, 0.05) for s in range(12)], abs=1e-15)
    assert mus[0] == 0.0 and mus[3] == pytest.approx(0.9) and mus[8:] == [0.05] * 4
    assert not algo.plan(0).demos and algo.plan(1).demos  # mu = 0 skips the expert sequences
    sft_only = make_algo("chord", mu_peak=1.0, mu_valley=1.0).plan(0)
    assert not sft_only.rollouts and not sft_only.old_logp
    demos_only = batch.select(batch.is_demo)
    assert bool(make_algo("chord").keep_sequences(demos_only).all())  # no rollouts: keep every expert sequence


def test_chord_sft_only_step_trains_on_experts_without_old_logp():
    batch, logp, entropy = make_batch(seed=49, k=4)
    keep = batch.is_demo
    batch, logp, entropy = batch.select(keep), logp[keep], entropy[keep]
    batch.old_logp = batch.old_entropy = None
    algo = make_algo("chord", mu_peak=1.0, mu_valley=1.0)
    loss = run_split(algo, batch, logp, entropy, algo.plan(0), ranks=2, micro=2)[0]
    want = hyb.chord(ref.with_rollout(algo.cfg, algo.rollout), batch, logp, entropy, 0)[0]
    assert float(loss.detach()) == pytest.approx(float(want.detach()), abs=1e-12)


def test_hpt_routing_and_metrics():
    batch, logp, entropy = make_batch(seed=46, k=4, demos=(1, 0, 2, 1))
    for gate in (0, 1, 2):
        algo = make_algo("hpt", gate=gate)
        _, shares, final, _ = run_split(algo, batch, logp, entropy, ranks=2, micro=2)
        want = hyb.hpt(algo.cfg, batch, logp, entropy)[1]
        assert final["hpt/sft_frac"] == pytest.approx(want["hpt/sft_frac"])
        assert {"hpt/sft_loss", "hpt/pg_loss", "entropy/rollout"} <= set(shares)


def test_luffy_metrics_match_loops():
    batch, logp, entropy = make_batch(seed=47, k=4, demos=(1, 1, 1, 1), empty_prob=0.0)
    algo = make_algo("luffy")
    keep = algo.keep_sequences(batch)
    batch, logp, entropy = batch.select(keep), logp[keep], entropy[keep]
    _, shares, final, _ = run_split(algo, batch, logp, entropy, ranks=2, micro=2)
    v = ref.View(batch)
    p_demo = [math.exp(float(logp[s, t].detach())) for s in range(v.S) if v.demo[s] for t in v.tokens(s)]
    assert shares["luffy/off_prob_mean"] == pytest.approx(sum(p_demo) / len(p_demo), abs=1e-12)
    assert shares["luffy/f_mean"] == pytest.approx(sum(p / (p + 0.1) for p in p_demo) / len(p_demo), abs=1e-12)
    on = [math.exp(v.old[s][t]) for s in range(v.S) if not v.demo[s] for t in v.tokens(s)]
    assert shares["luffy/on_prob_mean"] == pytest.approx(sum(on) / len(on), abs=1e-12)
    rolls = [s for s in range(v.S) if not v.demo[s]]
    assert final["luffy/rollout_solved"] == pytest.approx(sum(v.reward[s] > 0 for s in rolls) / len(rolls))
    none = sum(all(v.reward[s] <= 0 for s in v.seqs(p, demo=False)) for p in v.prompts())
    assert final["luffy/solve_none"] == none


def test_dft_logs_weighted_and_plain_nll():
    batch, logp, entropy = make_batch(seed=48)
    _, shares, _, _ = run_split(make_algo("dft"), batch, logp, entropy, ranks=2, micro=2)
    v = ref.View(batch)
    nll = [-float(logp[s, t].detach()) for s in range(v.S) if v.demo[s] for t in v.tokens(s)]
    assert shares["dft/nll"] == pytest.approx(sum(nll) / len(nll), abs=1e-12)
    assert shares["dft/loss"] == pytest.approx(sum(math.exp(-x) * x for x in nll) / len(nll), abs=1e-12)


SPEC_DEFAULTS = {
    "luffy": {"n_demos": 1, "gamma": 0.1, "adv_group": "all", "norm_adv_by_std": False,
              "loss_agg": "seq_mean_token_sum_norm", "clip": False, "entropy_coef": 0.001, "kl_coef": 0.0},
    "chord": {"expert_ratio": 0.2, "mu_warmup_steps": 0, "mu_decay_steps": 0, "mu_peak": 0.1, "mu_valley": 0.1,
              "phi": True, "cutoff_prob": 1.0, "token_level_sft": True, "clip_ratio_c": 3.0, "clip_ratio_low": 0.2,
              "entropy_coef": 0.0, "kl_coef": 0.0, "norm_adv_by_std": True},
    "hpt": {"gate": 0, "sft_coef": 1.0, "norm_adv_by_std": False, "loss_agg": "seq_mean_token_sum_norm",
            "clip": False, "entropy_coef": 0.001, "kl_coef": 0.0},
    "dft": {"sft_weight": "dft", "loss_agg": "token_mean"},
}


@pytest.mark.parametrize("name", sorted(SPEC_DEFAULTS))
def test_config_defaults_are_the_spec_ones_and_documented(name):
    from megahybrid.algorithms import get_algorithm
    from megahybrid.config.loader import field_docs

    cls = get_algorithm(name).Config
    docs = field_docs(cls)
    assert not [f for f in cls.__dataclass_fields__ if not docs.get(f, "").strip()]
    cfg = cls()
    assert {k: getattr(cfg, k) for k in SPEC_DEFAULTS[name]} == SPEC_DEFAULTS[name]
    assert cfg.validate() == [] and make_algo(name).state_dict() == {}


@pytest.mark.parametrize("name,overrides,key", [
    ("luffy", {"n_demos": 0}, "n_demos"), ("luffy", {"gamma": -1.0}, "gamma"),
    ("chord", {"expert_ratio": 1.0}, "expert_ratio"), ("chord", {"expert_ratio": 0.0}, "expert_ratio"),
    ("chord", {"mu_peak": 1.5}, "mu_peak"), ("hpt", {"gate": -1}, "gate"), ("dft", {"kl_coef": 0.1}, "kl_coef")])
def test_validate_names_the_bad_key(name, overrides, key):
    from megahybrid.algorithms import get_algorithm

    problems = get_algorithm(name).Config(**overrides).validate()
    assert problems and problems[0].startswith(f"{key}:")
