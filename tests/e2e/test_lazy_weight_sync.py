"""Weights reach the engines only before they next generate: consecutive SFT-only steps (SASR's warm-up) make no
sync, the first rollout step after them makes one, and the run still ends with its final weights exported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the e2e folder is not a package
from test_trainer_e2e import RELOAD_CHECK  # noqa: E402  (load a checkpoint, export it as an HF folder)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs/tiny/srft_arith.yaml")

pytestmark = pytest.mark.e2e

def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.mark.timeout(600)
def test_sft_steps_followed_by_sft_steps_skip_the_sync(tmp_path):
    run_dir = tmp_path / "run"
    # warm-up steps 0-2 are SFT; gamma 1e9 makes p ~ 0, so step 3 is a GRPO step (alpha < p never holds)
    overrides = ["algorithm.name=sasr", "algorithm.warmup_steps=3", "algorithm.gamma=1e9", "parallel.world_size=1",
                 "train.steps=4", "train.eval_every=0", "data.num_eval=0", "train.save_every=4",
                 "train.prompts_per_step=4", "rollout.n=2", "train.micro_batch_size=6", "logging.tensorboard=false",
                 "logging.plots=false", "logging.progress=false", f"train.run_dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "megahybrid", "train", CONFIG, *overrides], capture_output=True,
                          text=True, timeout=500, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["sasr/is_sft"] for r in records] == [1.0, 1.0, 1.0, 0.0]
    # step 1: nothing trained yet; steps 2 and 3 follow an SFT update but make no rollouts: no sync
    assert [r["time/sync_s"] for r in records[:3]] == [0.0, 0.0, 0.0]
    assert records[3]["time/sync_s"] > 0  # the GRPO step sends the three SFT updates at once
    assert all(r["optim/skipped"] == 0.0 for r in records)
    # the final weights were still exported at the end: they equal the last checkpoint's
    out = tmp_path / "reloaded"
    subprocess.run([sys.executable, "-c", RELOAD_CHECK, CONFIG, str(run_dir / "checkpoints/step_000004"), str(out),
                    *overrides], check=True, cwd=ROOT, timeout=300, capture_output=True, env=env)
    synced, reloaded = _tensors(run_dir / "weights"), _tensors(out)
    assert synced.keys() == reloaded.keys() and synced
    for name in synced:
        torch.testing.assert_close(reloaded[name], synced[name], rtol=0, atol=0, msg=name)
