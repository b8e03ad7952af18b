"""Issue 14: token-budget micro-batches (sorted by length, each trimmed to its longest row) and the methods'
declaration of whether the old-policy pass must run before the loss."""
import random

import pytest
import torch

from megahybrid.algorithms.base import Batch
from megahybrid.algorithms.registry import algorithm_names
from megahybrid.config.loader import load_config
from megahybrid.config.validate import micro_batch_token_budget, validate_config
from megahybrid.training.batching import budget_micro_batches, plan_micro_batches, sequence_lengths
from megahybrid.training.step import sum_payload_metrics

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "algorithms"))
from algo_harness import make_algo, make_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("seed", range(20))
def test_plan_covers_every_row_once_within_budget_and_row_cap(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 40))]
    budget, cap, multiple = rng.choice([60, 100, 256]), rng.randint(1, 12), rng.choice([1, 4, 16])
    plan = plan_micro_batches(lengths, max_rows=cap, max_tokens=budget, multiple=multiple)
    assert sorted(i for rows in plan for i in rows) == list(range(len(lengths)))
    for rows in plan:
        width = -(-max(lengths[i] for i in rows) // multiple) * multiple
        assert len(rows) <= cap
        assert len(rows) * width <= budget or len(rows) == 1  # a row over the budget stands alone
    # greedy packing by length: no micro-batch could have taken the next one's first row
    flat = [lengths[i] for rows in plan for i in rows]
    assert flat == sorted(flat, reverse=True)


def test_plan_without_budget_is_consecutive_rows_and_uniform_has_one_row_count():
    assert plan_micro_batches([3, 9, 1, 4, 2], max_rows=2, max_tokens=None) == [[0, 1], [2, 3], [4]]
    plan = plan_micro_batches([3, 9, 1, 4, 2], max_rows=8, max_tokens=20, uniform=True)
    assert plan == [[1, 3], [0, 4], [2]]  # 20 // 9 = 2 rows each, longest first


def test_short_rows_share_a_micro_batch_instead_of_paying_for_the_longest():
    lengths = [50] + [5] * 9
    plan = plan_micro_batches(lengths, max_rows=100, max_tokens=60)
    assert plan == [[0], list(range(1, 10))]  # old layout: 10 rows x 50 positions = 500 tokens of work
    assert sum(len(r) * max(lengths[i] for i in r) for r in plan) == 95


def _batch(lengths, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = len(lengths)
    mask = torch.zeros(S, T, dtype=torch.bool)
    for s, n in enumerate(lengths):
        mask[s, 2:n] = True
    return Batch(tokens=torch.randint(1, 30, (S, T), generator=g), response_mask=mask,
                 prompt_index=torch.arange(S) // 2, is_demo=torch.zeros(S, dtype=torch.bool),
                 rewards=torch.rand(S, generator=g), old_logp=torch.randn(S, T, generator=g),
                 engine_logp=torch.randn(S, T, generator=g), fields={"adv": torch.randn(S, generator=g),
                                                                      "w": torch.randn(S, T, generator=g)})


def test_budget_micro_batches_trim_keep_every_response_token_and_pad_the_count():
    lengths = [12, 3, 7, 5, 9]
    batch = _batch(lengths)
    assert sequence_lengths(batch) == lengths
    plan = plan_micro_batches(lengths, max_rows=4, max_tokens=16, multiple=4)
    mbs = budget_micro_batches(batch, plan, len(plan) + 2, pad_id=0, multiple=4)
    assert len(mbs) == len(plan) + 2
    for rows, mb in zip(plan, mbs):
        width = -(-max(lengths[i] for i in rows) // 4) * 4
        assert mb.tokens.shape == (len(rows), min(width, 12))
        idx = torch.tensor(rows)
        w = mb.tokens.shape[1]
        assert torch.equal(mb.tokens, batch.tokens[idx, :w]) and torch.equal(mb.fields["w"], batch.fields["w"][idx, :w])
        assert torch.equal(mb.fields["adv"], batch.fields["adv"][idx])
        assert int(mb.response_mask.sum()) == int(batch.response_mask[idx].sum())  # nothing cut off
    for empty in mbs[len(plan):]:
        assert not empty.response_mask.any() and (empty.prompt_index == -1).all()


NO_PASS_NEEDED = [name for name in algorithm_names()
                  if not make_algo(name).old_logp_before_loss and make_algo(name).plan(0).old_logp]


def test_the_declaration_is_a_property_of_settings_not_names():
    assert "grpo" in NO_PASS_NEEDED and "srft" not in NO_PASS_NEEDED
    assert make_algo("srft").old_logp_before_loss  # batch-scope entropy weights: means of H_old first
    assert not make_algo("srft", entropy_scope="token").old_logp_before_loss
    assert make_algo("grpo", rollout={"correction": "token_tis"}).old_logp_before_loss  # weights from old-engine


@pytest.mark.parametrize("name", NO_PASS_NEEDED)
def test_methods_that_skip_the_pass_never_read_old_values_before_the_loss(name):
    """prepare_batch on a batch without old log-probs/entropies: a method that read them would raise."""
    algo = make_algo(name)
    batch, logp, entropy = make_batch(3)
    bare = Batch(**{**batch.__dict__, "old_logp": None, "old_entropy": None})
    plan = algo.plan(0)
    prepared, stats = algo.prepare_batch(bare, plan)
    # and the loss then gives the values it gives with old = the current policy (what the forward supplies)
    full, stats_full = algo.prepare_batch(Batch(**{**batch.__dict__, "old_logp": logp.detach(),
                                                   "old_entropy": entropy.detach()}), plan)
    fwd = Batch(**{**prepared.__dict__, "old_logp": logp.detach(), "old_entropy": entropy.detach()})
    stats_full = {k: v for k, v in stats_full.items() if not k.startswith(("mismatch/", "max/mismatch"))}
    loss_a, _ = algo.loss(fwd, logp, entropy, stats, plan)
    loss_b, _ = algo.loss(full, logp, entropy, stats_full, plan)
    ga = torch.autograd.grad(loss_a, (logp,), allow_unused=True)[0]
    gb = torch.autograd.grad(loss_b, (logp,), allow_unused=True)[0]
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-12)
    if ga is not None or gb is not None:
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-12)


def test_max_metrics_take_the_maximum_over_micro_batches():
    payloads = [{"loss": 1.0, "metrics": {"a": 1.0, "max/x": 2.0}}, {"loss": 2.0, "metrics": {"a": 3.0, "max/x": -1.0}}]
    assert sum_payload_metrics(payloads, None) == (3.0, {"a": 4.0, "max/x": 2.0})


def test_budget_default_and_refusal():
    cfg = load_config(str(ROOT / "configs/tiny/srft_arith.yaml"), [])
    assert micro_batch_token_budget(cfg) == 2048
    cfg7 = load_config(str(ROOT / "configs/srl_7b.yaml"), [])
    assert micro_batch_token_budget(cfg7) == 8192 + 8192  # the longest sequence when that is longer
    low = load_config(str(ROOT / "configs/tiny/srft_arith.yaml"), ["train.max_tokens_per_micro_batch=20"], validate=False)
    assert any("train.max_tokens_per_micro_batch" in p and "40" in p for p in validate_config(low))


@pytest.mark.parametrize("name", algorithm_names())
def test_loss_and_gradient_over_trimmed_reordered_micro_batches_equal_one_micro_batch(name):
    """Global normalisation (DESIGN rule 2) over token-budget micro-batches: sorted, packed, each trimmed to its
    longest row. Every method, its default plan, float64."""
    algo = make_algo(name)
    batch, logp, entropy = make_batch(5, T=11)
    plan = algo.plan(0)
    prepared, stats = algo.prepare_batch(batch, plan)
    whole, _ = algo.loss(prepared, logp, entropy, stats, plan)
    rows_plan = plan_micro_batches(sequence_lengths(prepared), max_rows=5, max_tokens=24, multiple=2)
    assert len(rows_plan) > 2
    mbs = budget_micro_batches(prepared, rows_plan, len(rows_plan), pad_id=0, multiple=2)
    assert any(mb.tokens.shape[1] < prepared.tokens.shape[1] for mb in mbs)  # some were trimmed
    total = 0.0
    for rows, mb in zip(rows_plan, mbs):
        idx, width = torch.tensor(rows), mb.tokens.shape[1]
        total = total + algo.loss(mb, logp[idx, :width], entropy[idx, :width], stats, plan)[0]
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-12)
    g_whole = torch.autograd.grad(whole, (logp, entropy), allow_unused=True)
    g_split = torch.autograd.grad(total, (logp, entropy), allow_unused=True)
    for a, b in zip(g_whole, g_split):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
