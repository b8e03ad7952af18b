"""The local launcher's supervision: a rank killed by a signal is named with the signal, the others are stopped,
and the engine-like workers of the ranks (own sessions, like RolloutPool/RewardPool workers) do not outlive it.

The ranks here are small Python stand-ins (a real Megatron rank is tested in tests/e2e/test_reliability.py): what is
under test is the launcher, and a stand-in's PIDs and timing are under the test's control."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megahybrid.parallel import process_report
from megahybrid.parallel.process_report import describe_exit

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[3]

# a stand-in rank: starts a worker in a session of its own (as spawn_worker does), records both PIDs, waits
RANK = r"""
import os, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.tmp"), "w") as f:
    f.write(f"{os.getpid()} {worker.pid}")
os.rename(f.name, f.name[:-4] + ".pids")
time.sleep(600)
"""

DRIVER = r"""
import os, subprocess, sys
from megahybrid.training.launch_local import become_subreaper, supervise
become_subreaper()
procs = [subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[1]], env=dict(os.environ, RANK=str(r)))
         for r in range(2)]
sys.exit(supervise(procs, grace_s=0.5))
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigkilled_rank_is_named_and_no_process_outlives_the_job(tmp_path):
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path), RANK], cwd=ROOT, text=True,
                              stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("*.pids"))) < 2:
            assert time.monotonic() < deadline and driver.poll() is None, "the stand-in ranks did not start"
            time.sleep(0.1)
        pids = {int(p.name[4]): list(map(int, p.read_text().split())) for p in tmp_path.glob("*.pids")}
        os.kill(pids[1][0], signal.SIGKILL)
        _, err = driver.communicate(timeout=60)  # bounded: the launcher must not wait for rank 0 forever
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 128 + signal.SIGKILL, err
    assert f"rank 1 (pid {pids[1][0]}) was killed by SIGKILL" in err
    assert "stopping ranks 0" in err
    leftovers = [pid for rank in pids.values() for pid in rank if alive(pid)]
    assert not leftovers, f"processes outlived the job: {leftovers}\n{err}"


def test_sigkill_near_the_memory_limit_names_the_settings_to_lower(monkeypatch):
    monkeypatch.setattr(process_report, "machine_memory_bytes", lambda: 10 << 30)
    monkeypatch.setattr(process_report, "oom_kill_count", lambda: None)
    text = describe_exit("rank 0", 42, -signal.SIGKILL, peak_rss=6 << 30, job_rss=9 << 30)
    assert text.startswith("rank 0 (pid 42) was killed by SIGKILL. Likely cause: out of memory")
    assert "9.0 GiB of 10.0 GiB" in text and "train.micro_batch_size" in text
    far = describe_exit("rank 0", 42, -signal.SIGKILL, peak_rss=1 << 30, job_rss=2 << 30)
    assert "out of memory" not in far and "not near the limit" in far


def test_oom_kill_counter_is_a_cause_even_below_the_memory_mark(monkeypatch):
    monkeypatch.setattr(process_report, "machine_memory_bytes", lambda: 10 << 30)
    monkeypatch.setattr(process_report, "oom_kill_count", lambda: 3)
    text = describe_exit("rollout worker 0", 7, -signal.SIGKILL, job_rss=1 << 30, oom_kills_before=2)
    assert "Likely cause: out of memory" in text and "the kernel counted an OOM kill" in text


def test_other_exits_say_the_signal_or_the_code():
    assert describe_exit("rank 1", 5, -signal.SIGSEGV) == "rank 1 (pid 5) was killed by SIGSEGV"
    assert describe_exit("rank 1", 5, 1) == "rank 1 (pid 5) exited with code 1"


def test_full_disk_hint_names_the_run_dir(tmp_path, monkeypatch):
    import shutil

    from megahybrid.training import launch_local

    real = shutil.disk_usage
    run_dir = tmp_path / "run" / "not-yet-made"  # the nearest existing parent is measured
    monkeypatch.setattr(launch_local.shutil, "disk_usage", lambda p: real(p)._replace(total=100 << 20, free=1 << 20))
    hint = launch_local.full_disk_hint([str(run_dir)])
    assert hint is not None and hint.startswith(f"the file system of {run_dir} is full (1024 KiB free of 100 MiB)")
    monkeypatch.setattr(launch_local.shutil, "disk_usage", lambda p: real(p)._replace(total=100 << 20, free=50 << 20))
    assert launch_local.full_disk_hint([str(run_dir)]) is None
