"""Helpers of the fault-injection tests: the process tree of a running `megahybrid train` job, and a job whose
stderr goes to a file the test can read while the job runs."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from megahybrid.parallel.process_report import children_map, descendants

ENGINE, REWARD = "megahybrid.rollout.worker", "megahybrid.rewards.worker"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@dataclass
class Tree:
    ranks: list[int]
    """The launcher's children, rank 0 first (started in rank order, so PIDs ascend)."""
    workers: dict[int, str]
    """pid -> ENGINE / REWARD for every engine and reward worker below the ranks."""

    def all(self) -> list[int]:
        return [*self.ranks, *self.workers]

    def of(self, kind: str) -> list[int]:
        return sorted(pid for pid, k in self.workers.items() if k == kind)


def job_tree(launcher_pid: int) -> Tree:
    children = children_map()
    ranks = sorted(children.get(launcher_pid, []))
    workers = {}
    for pid in descendants(launcher_pid, children):
        line = cmdline(pid)
        for kind in (ENGINE, REWARD):
            if kind in line:
                workers[pid] = kind
    return Tree(ranks, workers)


class Job:
    """`megahybrid train` in the background (its own session, so a test can always kill all of it)."""

    def __init__(self, cmd: list[str], cwd: Path, log: Path):
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=dict(os.environ, OMP_NUM_THREADS="1"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"the job exited ({self.proc.returncode}) before {what}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-4000:]}")
            time.sleep(0.2)

    def wait(self, timeout: float) -> int:
        """The exit code; a job still running after `timeout` (a hang) is killed and fails the test."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the job did not exit within {timeout:.0f} s:\n{self.output()[-4000:]}") from None

    def kill(self) -> None:
        """Clean-up: SIGKILL the session (launcher and ranks) and every engine/reward worker below it."""
        if self.proc.poll() is None:
            pids = job_tree(self.pid).all()
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for pid in pids:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        self.proc.wait()
