"""Defect 4 of issue 12: pre-emption must not kill the rollout and reward workers. Slurm's step signal reaches
every process of the job step, whatever its session; the workers must ignore it and the trainer alone shuts
them down after its checkpoint.

A tiny `megahybrid train` run gets SIGUSR1 the way Slurm delivers it: to its process group and to every process
under it. Checked: each worker's kernel signal disposition (/proc/<pid>/status SigIgn) ignores SIGUSR1 and
SIGTERM, no engine restarted (the cumulative `rollout/restarts` of every step), the checkpoint of the step it
stopped at is complete, and the run exits 0."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs/tiny/srft_arith.yaml")
SMALL = ["train.prompts_per_step=4", "rollout.n=2", "data.num_eval=4", "train.micro_batch_size=6",
         "logging.tensorboard=false", "logging.plots=false", "logging.progress=false", "parallel.world_size=1",
         "train.eval_every=0", "train.save_every=0", "train.steps=200"]
WORKERS = ("megahybrid.rollout.worker", "megahybrid.rewards.worker")

pytestmark = pytest.mark.e2e


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def ignored_signals(pid: int) -> set[int]:
    """The signals whose disposition is SIG_IGN, from the kernel's view of the process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask >> (n - 1) & 1}
    raise AssertionError(f"no SigIgn line for pid {pid}")


@pytest.mark.timeout(900)
def test_sigusr1_to_the_whole_job_spares_the_workers(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "megahybrid", "train", CONFIG, *SMALL, f"train.run_dir={run_dir}"],
                            cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 600
        while len(records(run_dir)) < 2:  # engines started and used
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "the run did not reach step 2"
            time.sleep(0.5)
        job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        workers = [p for p in job if any(w in " ".join(p.cmdline()) for w in WORKERS)]
        assert any("rollout" in " ".join(p.cmdline()) for p in workers), [p.cmdline() for p in job]
        for p in workers:
            assert {signal.SIGUSR1, signal.SIGTERM} <= ignored_signals(p.pid), (p.pid, p.cmdline())
        os.killpg(proc.pid, signal.SIGUSR1)
        for p in job[1:]:  # what Slurm's step signal adds: processes in other sessions too
            try:
                p.send_signal(signal.SIGUSR1)
            except psutil.NoSuchProcess:
                pass
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-4000:]
    logged = records(run_dir)
    stopped_at = logged[-1]["step"]
    assert 2 <= stopped_at < 200
    assert (run_dir / "checkpoints" / f"step_{stopped_at:06d}" / "COMPLETE").is_file(), err[-4000:]
    assert [r["rollout/restarts"] for r in logged] == [0.0] * len(logged), err[-4000:]
    assert all(r["rollout/timeouts"] == 0.0 for r in logged)
