"""SPEC 10.D: each config error of the rollout correction and the SPEC 10.C methods exits 2 from `megahybrid config
check` with a line naming the dotted key(s) and what was expected."""
import subprocess
import sys
from pathlib import Path

import pytest

from megahybrid.cli import main

ROOT = Path(__file__).resolve().parents[3]

ERRORS = [
    (["algorithm.name=luffy", "rollout.n=4", "algorithm.n_demos=4"], "algorithm.n_demos (4) must be < rollout.n (4)"),
    (["algorithm.name=chord", "algorithm.expert_ratio=1.0"], "algorithm.expert_ratio: must be in (0, 1)"),
    (["algorithm.name=chord", "algorithm.expert_ratio=0"], "algorithm.expert_ratio: must be in (0, 1)"),
    (["rollout.correction=icepop", "rollout.mask_lo=6.0"], "rollout.mask_lo (6.0) must be <= rollout.mask_hi (5.0)"),
    (["rollout.correction=seq_mis", "rollout.mask_lo=0.9", "rollout.mask_hi=0.8"],
     "rollout.mask_lo (0.9) must be <= rollout.mask_hi (0.8)"),
    (["algorithm.name=dft", "rollout.correction=token_tis"], "rollout.correction=token_tis needs engine log-probs"),
    (["algorithm.name=grpo", "algorithm.tis_cap=2.0", "rollout.is_cap=3.0"],
     "algorithm.tis_cap (2.0) and rollout.is_cap (3.0) are both set and differ"),
    (["algorithm.name=grpo", "algorithm.tis_cap=2.0", "rollout.correction=icepop"],
     "algorithm.tis_cap (2.0) is an alias for rollout.correction=token_tis"),
    (["rollout.correction=nope"], "rollout.correction: expected one of"),
    (["rollout.mismatch_patience=0"], "rollout.mismatch_patience: must be >= 1"),
]


@pytest.mark.parametrize("overrides,fragment", ERRORS, ids=[e[1][:40] for e in ERRORS])
def test_config_error_exits_2_naming_the_key(overrides, fragment, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {steps: 1}\n")
    code = main(["config", "check", str(cfg), *overrides])  # in-process: the CLI's own code path
    err = capsys.readouterr().err
    assert code == 2 and fragment in err, err


def test_consistent_settings_pass(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {steps: 1}\n")
    ok = [["algorithm.name=grpo", "algorithm.tis_cap=2.0", "rollout.is_cap=2.0"],
          ["algorithm.name=luffy", "rollout.n=4", "algorithm.n_demos=3", "rollout.correction=seq_mis",
           "rollout.seq_stat=geo_mean"],
          ["algorithm.name=dft"], ["rollout.max_mismatch_k3=0.05", "rollout.correction=icepop"]]
    for overrides in ok:
        assert main(["config", "check", str(cfg), *overrides]) == 0, capsys.readouterr().err


def test_exit_code_of_the_real_process(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {steps: 1}\n")
    out = subprocess.run([sys.executable, "-m", "megahybrid", "config", "check", str(cfg), "algorithm.name=luffy",
                          "rollout.n=2", "algorithm.n_demos=2"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "algorithm.n_demos (2) must be < rollout.n (2)" in out.stderr
