"""What a first-time user sees: bad data is one line and exit 2 before anything starts; running the main command a
second time reports the finished run's real result; `--fresh` is one flag away; no-eval runs say so (not nan)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megahybrid.config.loader import load_config
from megahybrid.training.entry import eval_status, final_line

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs/tiny/srft_arith.yaml")
SMALL = ["train.prompts_per_step=4", "rollout.n=2", "data.num_eval=4", "train.micro_batch_size=6",
         "logging.tensorboard=false", "logging.plots=false", "logging.progress=false"]


def megahybrid(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megahybrid", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.parametrize("content, expected", [
    (None, "data error: {f}: file not found (from data.train)"),
    ('{"prompt": "1+1=", "answer": "2"}\n{"prompt": oops\n', "data error: {f}:2: malformed JSON"),
    ('{"prompt": "1+1=", "answer": ""}\n', "data error: {f}:1: field 'answer' is empty"),
    ('{"prompt": "' + "9" * 40 + '", "answer": "2"}\n',
     "data error: {f}:1: field 'prompt' 41 tokens under the 'plain' template, more than data.max_prompt_tokens=16"),
])
def test_bad_data_is_one_line_and_exit_2_before_any_rank(tmp_path, content, expected):
    data = tmp_path / "train.jsonl"
    if content is not None:
        data.write_text(content)
    run_dir = tmp_path / "run"
    # the default config has 2 ranks and an engine: the check must run before any of them exists
    proc = megahybrid("train", CONFIG, f"data.train={data}", f"train.run_dir={run_dir}", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [line for line in lines if line.startswith("data error:")] and len(lines) == 1, lines
    assert lines[0].startswith(expected.format(f=data))
    assert not run_dir.exists()  # no partial output


def test_eval_status_and_final_line():
    """Configs without a held-out split, or with num_eval 0, say so instead of printing accuracy=nan."""
    file_cfg = load_config(CONFIG, ["data.train=x.jsonl"])
    assert eval_status(file_cfg) == "no eval split (data.eval is not set)"
    assert eval_status(load_config(CONFIG, ["data.num_eval=0"])) == "no evaluation (data.num_eval: 0)"
    assert eval_status(load_config(CONFIG, [])) is None
    assert eval_status(load_config(str(ROOT / "configs/srft_7b.yaml"), [])) is not None
    final = {"accuracy": float("nan"), "step0_accuracy": float("nan"), "steps": 3, "plots": "p",
             "eval": "no eval split (data.eval is not set)"}
    line = final_line(final, wall_s=5)
    assert "nan" not in line and line == "megahybrid: final eval: no eval split (data.eval is not set); steps=3 wall=5s plots=p"
    # a pre-empted run had no final evaluation: the line says so and names the step of the accuracy it shows
    final = {"accuracy": 0.25, "step0_accuracy": 0.125, "steps": 85, "plots": "p", "eval": "ok", "preempted": True,
             "eval_step": 50}
    assert final_line(final, wall_s=7) == ("megahybrid: pre-empted after step 85 (checkpoint saved; the same command "
                                           "resumes); last eval accuracy=0.250 at step 50 (step 0: 0.125) steps=85 "
                                           "wall=7s plots=p")
    assert final_line(dict(final, preempted=False), wall_s=7).startswith("megahybrid: final eval accuracy=0.250 ")


@pytest.mark.e2e
@pytest.mark.slow
def test_second_run_reports_the_finished_result_and_fresh_starts_over(tmp_path):
    run_dir = tmp_path / "run"
    first = megahybrid("train", CONFIG, *SMALL, "train.steps=2", f"train.run_dir={run_dir}")
    assert first.returncode == 0, first.stderr[-4000:]
    recorded = json.loads((run_dir / "final.json").read_text())
    first_line = first.stdout.strip().splitlines()[-1]
    assert first_line.startswith("megahybrid: final eval accuracy=") and "nan" not in first_line
    metrics_before = (run_dir / "metrics.jsonl").read_bytes()

    # the same command again: nothing trains, the recorded result is reported, nothing is rewritten
    again = megahybrid("train", CONFIG, *SMALL, "train.steps=2", f"train.run_dir={run_dir}", timeout=60)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete (2 steps)" in again.stderr and "--fresh" in again.stderr
    last = again.stdout.strip().splitlines()[-1]
    assert f"final eval accuracy={recorded['accuracy']:.3f} (step 0: {recorded['step0_accuracy']:.3f}) steps=2" in last
    assert "nan" not in last and "already complete" in last
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics_before
    assert json.loads((run_dir / "final.json").read_text()) == recorded

    # fewer steps than the run has: said so
    fewer = megahybrid("train", CONFIG, *SMALL, "train.steps=1", f"train.run_dir={run_dir}", timeout=60)
    assert fewer.returncode == 0 and "train.steps=1 is fewer than the 2 steps this run already has" in fewer.stderr

    # --fresh: the old run is kept aside, a new one trains from step 0; num_eval 0 says "no evaluation"
    fresh = megahybrid("train", CONFIG, "--fresh", *SMALL, "train.steps=1", "data.num_eval=0",
                       f"train.run_dir={run_dir}")
    assert fresh.returncode == 0, fresh.stderr[-4000:]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(kept) == 1 and (kept[0] / "metrics.jsonl").read_bytes() == metrics_before
    assert fresh.stdout.strip().splitlines()[-1].startswith("megahybrid: final eval: no evaluation (data.num_eval: 0);")
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]
    # the known CPU fallback warnings are replaced by one line; nothing else was silenced to get there
    assert "Falling back to" not in fresh.stderr and "CPU mode:" in fresh.stderr
