"""A worker that has already exited can leave a child of its session behind; kill_worker stops that child too
(before, it skipped the group kill when the worker itself was gone, and the child outlived the job)."""
import subprocess
import sys
import time

from megahybrid.rewards.subproc import kill_worker

SCRIPT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_kill_worker_stops_the_session_left_by_an_exited_worker():
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    child = int(proc.stdout.readline())
    deadline = time.time() + 30
    while proc.returncode is None and time.time() < deadline:  # the worker exits; its child stays
        time.sleep(0.05)
        if not _alive(proc.pid):
            break
    assert _alive(child)
    kill_worker(proc, None)
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
