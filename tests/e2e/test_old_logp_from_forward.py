"""Issue 14: a GRPO step takes its old log-probs from the training forward (no separate no-grad pass), and that
changes nothing but the time: loss, gradient norm, drift metrics and the trained weights equal those of a run that
makes the pass (`train.old_logp_pass=always`), to float rounding. Token-budget micro-batches are on in both."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the e2e folder is not a package
from test_trainer_e2e import metrics, run_train, untimed, weights  # noqa: E402

pytestmark = pytest.mark.e2e

GRPO = ["algorithm.name=grpo", "train.steps=2", "train.eval_every=0", "data.num_eval=0", "train.save_every=0",
        "train.max_tokens_per_micro_batch=60"]  # a budget of a few rows: several trimmed micro-batches per rank


@pytest.mark.timeout(900)
def test_grpo_without_the_old_logp_pass_matches_the_run_with_it(tmp_path):
    run_train(tmp_path / "fwd", *GRPO)
    run_train(tmp_path / "pass", *GRPO, "train.old_logp_pass=always")
    fwd, full = metrics(tmp_path / "fwd"), metrics(tmp_path / "pass")
    assert [m["batch/old_logp_pass"] for m in fwd] == [0.0, 0.0]
    assert [m["batch/old_logp_pass"] for m in full] == [1.0, 1.0]
    for a, b in zip(fwd, full):
        a, b = untimed(a), untimed(b)
        assert set(a) == set(b)
        for key in ("actor/grad_norm", "mismatch/k3", "mismatch/logp_abs_diff_mean", "reward/mean"):
            assert key in a, key
        for key in a:
            if key in ("batch/old_logp_pass", "step"):
                continue
            va, vb = float(a[key]), float(b[key])
            assert math.isclose(va, vb, rel_tol=1e-4, abs_tol=1e-6) or (math.isnan(va) and math.isnan(vb)), \
                (key, va, vb)
    wa, wb = weights(tmp_path / "fwd"), weights(tmp_path / "pass")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6, msg=k)
