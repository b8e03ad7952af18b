"""SPEC 10.A/10.B through whole methods: rollout correction modes, reject scopes, clip: false, sft_weight and the
seq_mean_token_sum_norm aggregation against the loop re-statement (values, gradients, 1x4 / 2x2 / 4x1 splits);
the `mismatch/*` and `rollout_corr/*` metrics against loops; the drift alarm on a skipped weight sync."""
import math

import pytest
import torch

import algo_reference as ref
from algo_harness import make_algo, make_batch, run_split
from test_algorithms_methods import check_against_reference

MODES = [
    {"correction": "token_tis"},
    {"correction": "token_tis", "is_cap": 1.2, "is_lo": 0.8},
    {"correction": "seq_tis", "is_cap": 1.5, "is_lo": 0.5},
    {"correction": "seq_mis"},
    {"correction": "seq_mis", "seq_stat": "geo_mean", "mask_lo": 0.9, "mask_hi": 1.1},
    {"correction": "seq_mis", "reject_scope": "mask"},
    {"correction": "icepop", "mask_lo": 0.8, "mask_hi": 1.25},
    {"correction": "icepop", "mask_lo": 0.8, "mask_hi": 1.25, "reject_scope": "mask"},
]
METHOD_CASES = [("grpo", {"kl_coef": 0.05, "entropy_coef": 0.01, "clip_ratio_c": 3.0}),
                ("superrl", {"gate": "advantage"}), ("srft", {})]


@pytest.mark.parametrize("rollout", MODES, ids=lambda r: "-".join(str(v) for v in r.values()))
@pytest.mark.parametrize("name,overrides", METHOD_CASES, ids=[c[0] for c in METHOD_CASES])
def test_correction_modes_match_reference_for_every_split(name, overrides, rollout):
    batch, logp, entropy = make_batch(seed=31, rewards="float")
    algo = make_algo(name, rollout=rollout, **overrides)
    check_against_reference(name, {**overrides, "rollout": rollout}, None, batch, logp, entropy)
    if rollout.get("reject_scope") == "mask":  # something was rejected, so the mask scope was exercised
        prepared, _ = algo.prepare_batch(batch, algo.plan(0))
        assert int(prepared.response_mask.sum()) < int(batch.response_mask.sum())


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("overrides", [{"clip": False}, {"clip": False, "norm_adv_by_std": False, "tis_cap": 1.5}])
def test_clip_false_and_norm_aggregation(overrides, agg):
    batch, logp, entropy = make_batch(seed=32, rewards="float")
    _, shares, _ = check_against_reference("grpo", {"loss_agg": agg, **overrides}, None, batch, logp, entropy)
    assert shares["actor/clip_frac"] == 0.0


@pytest.mark.parametrize("name,overrides", [("sft", {"sft_weight": "dft"}), ("sft", {"sft_weight": "phi"}),
                                            ("superrl", {"sft_weight": "phi"}),
                                            ("superrl", {"gate": "uncertainty", "sft_weight": "dft"})])
def test_sft_weight_on_demo_nll(name, overrides):
    batch, logp, entropy = make_batch(seed=33)
    check_against_reference(name, overrides, None, batch, logp, entropy)


def test_tis_cap_alias_equals_token_tis():
    batch, logp, entropy = make_batch(seed=34)
    a = run_split(make_algo("grpo", tis_cap=1.3), batch, logp, entropy, ranks=2, micro=2)[0]
    b = run_split(make_algo("grpo", rollout={"correction": "token_tis", "is_cap": 1.3}), batch, logp, entropy,
                  ranks=2, micro=2)[0]
    c = run_split(make_algo("grpo"), batch, logp, entropy, ranks=2, micro=2)[0]
    a, b, c = float(a.detach()), float(b.detach()), float(c.detach())
    assert a == pytest.approx(b, abs=1e-14) and a != pytest.approx(c, abs=1e-6)


def loop_weights(batch, rollout):
    """{(s, t): w} of every rollout token, from the loop re-statement."""
    algo = make_algo("grpo", rollout=rollout)
    cfg, v = ref.with_rollout(algo.cfg, algo.rollout), ref.View(batch)
    return {(s, t): ref.rc_weight(cfg, v, s, t) for s in range(v.S) if not v.demo[s] for t in v.tokens(s)}


@pytest.mark.parametrize("rollout", MODES, ids=lambda r: "-".join(str(v) for v in r.values()))
def test_correction_metrics_match_loops(rollout):
    batch, logp, entropy = make_batch(seed=35)
    algo = make_algo("grpo", rollout=rollout)
    final = run_split(algo, batch, logp, entropy, ranks=2, micro=2)[2]
    v = ref.View(batch)
    w = loop_weights(batch, rollout)
    ws = list(w.values())
    mean = sum(ws) / len(ws)
    assert final["rollout_corr/weight_mean"] == pytest.approx(mean, abs=1e-12)
    assert final["rollout_corr/weight_max"] == pytest.approx(max(ws), abs=1e-12)
    assert final["rollout_corr/weight_min"] == pytest.approx(min(ws), abs=1e-12)
    assert final["rollout_corr/ess"] == pytest.approx(1 / (sum((x / mean) ** 2 for x in ws) / len(ws)), abs=1e-12)
    mode = rollout["correction"]
    seqs = sorted({s for s, _ in w})
    if mode in ("token_tis", "seq_tis"):
        cap, lo = rollout.get("is_cap", 2.0), rollout.get("is_lo", 0.0)
        if mode == "token_tis":
            raw = [math.exp(v.old[s][t] - v.engine[s][t]) for s, t in w]
        else:
            raw = [math.exp(sum(v.old[s][t] - v.engine[s][t] for t in v.tokens(s))) for s in seqs]
        assert final["rollout_corr/clip_frac"] == pytest.approx(sum(r < lo or r > cap for r in raw) / len(raw))
    elif mode == "icepop":
        assert final["rollout_corr/masked_frac"] == pytest.approx(sum(x == 0 for x in ws) / len(ws))
    else:
        rejected = [s for s in seqs if all(w[(s, t)] == 0 for t in v.tokens(s))]
        assert final["rollout_corr/masked_frac"] == pytest.approx(len(rejected) / len(seqs))
        assert final["rollout_corr/masked_token_frac"] == pytest.approx(sum(x == 0 for x in ws) / len(ws))
        assert 0 < len(rejected) < len(seqs)


def test_mismatch_metrics_match_loops_and_are_logged_without_correction():
    batch, logp, entropy = make_batch(seed=36)
    final = run_split(make_algo("grpo"), batch, logp, entropy, ranks=2, micro=2)[2]
    v = ref.View(batch)
    d = [v.old[s][t] - v.engine[s][t] for s in range(v.S) if not v.demo[s] for t in v.tokens(s)]
    assert final["mismatch/logp_abs_diff_mean"] == pytest.approx(sum(abs(x) for x in d) / len(d), abs=1e-12)
    assert final["mismatch/logp_abs_diff_max"] == pytest.approx(max(abs(x) for x in d), abs=1e-12)
    assert final["mismatch/k1"] == pytest.approx(sum(-x for x in d) / len(d), abs=1e-12)
    assert final["mismatch/k3"] == pytest.approx(sum(math.exp(x) - x - 1 for x in d) / len(d), abs=1e-12)
    assert final["mismatch/mult_prob_error"] == pytest.approx(sum(math.exp(abs(x)) for x in d) / len(d), abs=1e-12)
    assert not any(k.startswith("rollout_corr/") for k in final)


def test_correction_without_engine_logp_is_a_clear_error():
    batch, logp, entropy = make_batch(seed=37)
    batch.engine_logp = None
    with pytest.raises(ValueError, match="engine"):
        run_split(make_algo("grpo", rollout={"correction": "icepop"}), batch, logp, entropy)
