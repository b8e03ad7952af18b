"""benchmarks/e2e_step.py's pure parts: per-step metrics parsing, the median over steps, the final line, the TRL
sweep's settings and reward re-implementation. Installs and runs nothing (no TRL, no training, no timings)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


e2e = load("e2e_step")
peer = load("trl_grpo_peer")


def write_metrics(path: Path, lines: list) -> Path:
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def test_median_over_steps_reads_only_the_chosen_steps(tmp_path):
    lines = [{"step": s, "time/step_s": float(s), "time/rollout_s": s / 10, "reward/mean": 0.0} for s in range(1, 9)]
    lines.insert(3, {"step": 3, "eval/accuracy": 0.5})  # an evaluation line: no step time, skipped
    lines.append("")  # a trailing blank line
    recs = e2e.read_step_records(write_metrics(tmp_path / "metrics.jsonl", lines))
    assert sorted(recs) == list(range(1, 9))
    med = e2e.median_over_steps(recs, 5, 8, ("time/step_s", "time/rollout_s", "time/old_logp_s"))
    assert med["steps"] == 4
    assert med["time/step_s"] == pytest.approx(6.5)  # median of 5, 6, 7, 8
    assert med["time/rollout_s"] == pytest.approx(0.65)
    assert "time/old_logp_s" not in med  # absent from every step: not reported as 0


def test_a_repeated_step_keeps_its_last_line_and_an_empty_range_is_an_error(tmp_path):
    lines = [{"step": 5, "time/step_s": 9.0}, {"step": 5, "time/step_s": 1.0}, {"step": 6, "time/step_s": 3.0}]
    recs = e2e.read_step_records(write_metrics(tmp_path / "m.jsonl", lines))
    assert recs[5]["time/step_s"] == 1.0
    assert e2e.median_over_steps(recs, 5, 6, ("time/step_s",))["time/step_s"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no steps"):
        e2e.median_over_steps(recs, 7, 9, ("time/step_s",))


def test_final_line_format():
    assert e2e.final_line(1.23456, 0.5) == "e2e: tiny_ratio=1.235 smol_ratio=0.500"
    assert e2e.final_line(None, 2.0) == "e2e: tiny_ratio=nan smol_ratio=2.000"
    assert e2e.final_line(math.nan, None) == "e2e: tiny_ratio=nan smol_ratio=nan"


def test_trl_settings_keep_one_optimizer_step_per_batch():
    for shape, spec in e2e.SHAPES.items():
        total = spec["prompts_per_step"] * spec["n"]
        fixed = e2e.TRL_SETTINGS[shape]
        assert fixed["per_device_train_batch_size"] * fixed["gradient_accumulation_steps"] == total
        cands = e2e.sweep_candidates(shape)
        assert cands and all(c["per_device_train_batch_size"] * c["gradient_accumulation_steps"] == total
                             for c in cands)
        assert "per_device_train_batch_size=" in e2e.trl_setting_str(fixed)


def test_peer_reward_matches_the_math_reward_on_plain_cases():
    from megahybrid.rewards.functions import math_reward

    cases = [("\\boxed{42}", "42"), ("<think>1+1=2</think>\\boxed{ 7 }", "7"), ("so 12", "12"), ("x\\boxed{3", "3"),
             ("\\boxed{1}\\boxed{2}", "2"), ("nothing", "5"), ("</think> 0042", "42"), ("-3", "-3")]
    got = peer.math_reward([c for c, _ in cases], [a for _, a in cases])
    assert got == [math_reward(c, a) for c, a in cases]
