"""`relift` (SPEC 10.C 4.9): the GRPO part against the loop reference (splits), the hardest-prompt buffer (newest
first, pop M newest, at most one phase per step), the SFT-phase loss against a loop, the state round trip and
its config errors."""
import math

import pytest
import torch

import algo_reference as ref
from algo_harness import grads, make_algo, make_batch, run_split
from megahybrid.algorithms.base import GroupSummary
from megahybrid.algorithms.losses import STAT_DTYPE
from test_algorithms_methods import SPLITS


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_sum_norm"])
def test_rl_step_is_grpo_with_the_recipe_settings(agg):
    batch, logp, entropy = make_batch(seed=50, rewards="float", demos=(0,))
    algo = make_algo("relift", loss_agg=agg)
    cfg = ref.with_rollout(algo.cfg, algo.rollout)
    want = ref.grpo(cfg, batch, logp, entropy, 0.0)[0]
    want_g = grads(want, [logp, entropy])
    for micro, ranks, pad in SPLITS:
        loss = run_split(algo, batch, logp, entropy, ranks=ranks, micro=micro, pad=pad)[0]
        assert float(loss.detach()) == pytest.approx(float(want.detach()), abs=1e-9)
        for got, exp in zip(grads(loss, [logp, entropy]), want_g):
            torch.testing.assert_close(got, exp, rtol=0, atol=1e-9)


def summaries(spec):
    """spec: list of (example index, rollout rewards, demos)."""
    return [GroupSummary(example_index=i, rollout_rewards=r, num_demos=d) for i, r, d in spec]


def test_buffer_is_newest_first_and_pops_the_m_newest():
    algo = make_algo("relift", buffer_size=4, sft_mini_batch=2)
    m = algo.observe_groups(0, summaries([(1, [0.0, 0.0], 1), (2, [1.0, 0.0], 1), (3, [0.0, 0.0], 0),
                                          (4, [0.0, -1.0], 1), (5, [0.0, 0.0], 2)]))
    assert m["relift/hard_frac"] == pytest.approx(2 / 5)  # 1 and 5: all rewards exactly 0 and a demo
    assert algo.buffer == [(1, 0), (5, 0)]
    assert algo.after_step(None, 1.0)["relift/sft_phase"] == 0.0 and algo.extra_phases(0) == []
    algo.observe_groups(1, summaries([(7, [0.0], 1), (1, [0.0], 1), (8, [0.0], 1)]))  # 1 again: pushed again
    assert algo.buffer == [(7, 0), (1, 0), (8, 0), (1, 0), (5, 0)]
    after = algo.after_step(None, 1.0)
    assert after == {"relift/sft_phase": 1.0, "relift/buffer_size": 1.0}
    (phase,) = algo.extra_phases(1)
    assert phase.examples == [(7, 0), (1, 0), (8, 0), (1, 0)] and algo.buffer == [(5, 0)]
    assert phase.mini_batch == 2 and phase.epochs == 1 and phase.temperature == 1.0
    assert phase.optimizer == {"lr": 1e-6, "weight_decay": 0.01, "adam_beta1": 0.9, "adam_beta2": 0.999,
                               "clip_grad": 1.0}
    assert algo.extra_phases(1) == []  # what is left is below M
    algo.after_extra_phase(phase, {"relift/sft_loss": 2.0, "grad_norm": 3.0})
    assert algo.num_sft_phases == 1
    disabled = make_algo("relift", buffer_size=-1)
    disabled.observe_groups(0, summaries([(i, [0.0], 1) for i in range(300)]))
    assert disabled.extra_phases(0) == []


def test_state_round_trip_reproduces_the_next_phase():
    a = make_algo("relift", buffer_size=2, sft_mini_batch=1)
    a.observe_groups(0, summaries([(3, [0.0], 1), (4, [0.0], 1), (6, [0.0], 1)]))
    a.after_extra_phase(a.extra_phases(0)[0], {})
    a.observe_groups(1, summaries([(9, [0.0], 1)]))
    b = make_algo("relift", buffer_size=2, sft_mini_batch=1)
    b.load_state_dict(torch.load(_save(a.state_dict()), weights_only=False))
    assert b.buffer == a.buffer == [(9, 0), (6, 0)] and b.num_sft_phases == 1
    assert b.extra_phases(2)[0].examples == a.extra_phases(2)[0].examples
    with pytest.raises(ValueError, match="relift state keys"):
        b.load_state_dict({"buffer": []})


def _save(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_sft_phase_loss_matches_loop():
    from algo_harness import rank_indices, reduce_stats
    from megahybrid.algorithms.common import base_stats

    batch, logp, entropy = make_batch(seed=51, demos=(1, 2, 1, 1))
    demos = batch.is_demo
    batch = batch.select(demos)  # a phase batch holds demo sequences only
    logp, entropy = logp[demos].detach().requires_grad_(), entropy[demos].detach().requires_grad_()
    algo = make_algo("relift", buffer_size=4, sft_mini_batch=2, sft_weight="dft")
    algo.observe_groups(0, summaries([(i, [0.0], 1) for i in range(4)]))
    (phase,) = algo.extra_phases(0)
    total = 0.0
    parts = [batch.select(i) for i in rank_indices(batch, 2)]
    stats = reduce_stats([base_stats(b) for b in parts])
    for idx in rank_indices(batch, 2):
        total = total + algo.extra_loss(phase, batch.select(idx), logp[idx], entropy[idx], stats)[0]
    v = ref.View(batch)
    toks = [(s, t) for s in range(v.S) for t in v.tokens(s)]
    want = ref.tsum(-math.exp(float(logp[s, t].detach())) * logp[s, t] for s, t in toks) / len(toks) \
        - 0.001 * ref.tsum(entropy[s, t] for s, t in toks) / len(toks)
    assert float(total.detach()) == pytest.approx(float(want.detach()), abs=1e-12)
    for got, exp in zip(grads(total, [logp, entropy]), grads(want, [logp, entropy])):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-12)
    assert stats["num_tokens/demo"].dtype == STAT_DTYPE


@pytest.mark.parametrize("overrides,fragment", [
    (["algorithm.buffer_size=128", "algorithm.sft_mini_batch=48"], "algorithm.sft_mini_batch (48) must be >= 1 and "
                                                                   "divide buffer_size (128)"),
    (["algorithm.buffer_size=0"], "algorithm.buffer_size: must be >= 1 (or -1"),
])
def test_config_errors_exit_2(overrides, fragment, tmp_path, capsys):
    from megahybrid.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {steps: 1}\n")
    assert main(["config", "check", str(cfg), "algorithm.name=relift", *overrides]) == 2
    assert fragment in capsys.readouterr().err


def test_config_defaults_are_the_spec_ones_and_documented():
    from megahybrid.algorithms import get_algorithm
    from megahybrid.config.loader import field_docs

    cls = get_algorithm("relift").Config
    docs = field_docs(cls)
    assert not [f for f in cls.__dataclass_fields__ if not docs.get(f, "").strip()]
    want = {"buffer_size": 128, "sft_epochs": 1, "sft_mini_batch": 128, "sft_entropy_coef": 0.001, "sft_lr": 1e-6,
            "sft_weight_decay": 0.01, "sft_grad_clip": 1.0, "norm_adv_by_std": False,
            "loss_agg": "seq_mean_token_sum_norm", "clip": False, "entropy_coef": 0.001, "kl_coef": 0.0}
    cfg = cls()
    assert {k: getattr(cfg, k) for k in want} == want and cfg.validate() == []
    assert make_algo("relift").state_dict() == {"buffer": [], "num_sft_phases": 0}
