"""Tiny random Llama, one process: `megahybrid export` and `megahybrid eval` on Hugging Face folders.

`megahybrid export` publishes the folder whole or not at all. The writer is made to fail after the weights are
on disk but before the config (an injected fault: a real crash cannot be produced at that point on demand): no
--out folder and no staging folder remain. A staging folder of a killed export is cleaned by the next one; an
existing --out is refused (exit 2).
`megahybrid eval --model EXPORT` runs the config's held-out evaluation (its eval_n, eval_max_new_tokens) on the
folder, and `--checkpoint RUN_DIR` of the same weights gives the same numbers (one seeded sampler, two routes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from rollout_helpers import build_tiny  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "dist" / "export_worker.py"

# the export, with `_write_config_and_tokenizer` (it runs after the safetensors are written) failing
FAILING_EXPORT = r"""
import sys
import megahybrid.training.policy_checkpoint as pc
def broken(*args, **kwargs):
    raise RuntimeError("injected failure between weights and config")
pc._write_config_and_tokenizer = broken
from megahybrid.cli import main
if __name__ == "__main__":
    sys.exit(main(["export", sys.argv[1], "--out", sys.argv[2]]))
"""


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, *args], env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("atomic")
    model = build_tiny(root)
    torch.save(torch.randint(3, 20, (2, 12)), root / "tokens.pt")
    proc = _run([str(WORKER), "save", str(root / "run" / "trainer.pt"), model, str(root / "tokens.pt"),
                 str(root / "run"), "1,1"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "run"


def test_a_failing_writer_leaves_no_folder(run_dir, tmp_path):
    out = tmp_path / "exports" / "model"
    proc = _run(["-c", FAILING_EXPORT, str(run_dir), str(out)])
    assert proc.returncode != 0 and "injected failure" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()
    assert list(out.parent.iterdir()) == [], list(out.parent.iterdir())  # the staging folder went too


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """An export made with a killed export's staging folder lying next to it (its pid: no such process)."""
    root = tmp_path_factory.mktemp("exported")
    stale = root / ".model.export-999999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    proc = _run(["-m", "megahybrid", "export", str(run_dir), "--out", str(root / "model")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "model"


def test_stale_staging_is_removed_and_existing_out_is_refused(run_dir, exported):
    assert sorted(p.name for p in exported.parent.iterdir()) == ["model"]  # the stale staging folder is gone
    assert (exported / "model.safetensors").is_file()
    assert json.loads((exported / "config.json").read_text())["max_position_embeddings"] == 512
    proc = _run(["-m", "megahybrid", "export", str(run_dir), "--out", str(exported)])
    assert proc.returncode == 2 and f"{exported} already exists" in proc.stderr, proc.stderr[-2000:]


def test_no_run_config_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "COMPLETE").write_text("{}")
    proc = _run(["-m", "megahybrid", "export", str(ckpt), "--out", str(tmp_path / "x")])
    assert proc.returncode == 2 and "no config.yaml next to" in proc.stderr and "--config" in proc.stderr


EVAL_CONFIG = """
model: {{hf_path: {model}, max_position_embeddings: 512}}   # the run's model: --checkpoint rebuilds it
data: {{train: "builtin:arith", difficulty: 1, demo_style: boxed, template: plain, max_prompt_tokens: 16,
        max_demo_tokens: 24, num_train: 50, num_eval: 6}}
rollout: {{n: 2, max_new_tokens: 8, num_workers: 1, kv_cache_memory_bytes: 33554432}}
reward: {{name: math, num_workers: 1}}
train: {{eval_n: 3, eval_temperature: 1.0, eval_max_new_tokens: 4, seed: 3, run_dir: {run_dir}}}
"""


def _metrics(proc: subprocess.CompletedProcess) -> dict[str, float]:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {k: float(v) for k, v in (line.split("=") for line in proc.stdout.splitlines() if line.startswith("eval/"))}


@pytest.mark.slow
def test_eval_on_an_hf_folder_equals_eval_of_the_checkpoint(run_dir, exported, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(EVAL_CONFIG.format(model=run_dir.parent / "model", run_dir=tmp_path / "evalrun"))
    folder = exported
    by_model = _metrics(_run(["-m", "megahybrid", "eval", str(config), "--model", str(folder)]))
    assert {"eval/avg@3", "eval/pass@1", "eval/pass@3", "eval/accuracy"} <= set(by_model), by_model
    assert 0 < by_model["eval/response_length"] <= 4  # the config's eval_max_new_tokens, not rollout's 8
    assert 0.0 <= by_model["eval/pass@1"] <= by_model["eval/pass@3"] <= 1.0
    by_ckpt = _metrics(_run(["-m", "megahybrid", "eval", str(config), "--checkpoint", str(run_dir)]))
    assert by_ckpt.pop("eval/checkpoint_step") == 1.0 and by_model.pop("eval/checkpoint_step") == -1.0
    assert by_ckpt == by_model
