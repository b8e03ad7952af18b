"""Worker processes started as `python -m <module> <fd>` with a socket connection to the parent.

A fresh interpreter (not multiprocessing's spawn/fork): the environment is set before anything loads, the
parent's `__main__` (a trainer script) is never re-imported, and no forked copy of the trainer's threads or
CUDA state exists. Each worker gets its own session, so a SIGKILL of its process group takes its children too.

Pre-emption signals (TRAINER_SIGNALS) belong to the trainer, which checkpoints at the next step boundary and
then shuts its workers down. Slurm signals every process of the job step (whatever its session), and a worker
with the default action would die minutes before that checkpoint. A handler set in the parent does not survive
exec, but a blocked mask does: the signals are blocked in the spawning thread across the Popen, and the worker
sets SIG_IGN (which its own children, e.g. vLLM's engine processes, inherit across exec) before unblocking.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[2])
TRAINER_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""Handled by the trainer (training/signals.py); ignored by every worker it spawns."""


def spawn_worker(module: str, *, env: dict[str, str] | None = None,
                 log_path: str | None = None) -> tuple[subprocess.Popen, Connection]:
    """Start `python -m module <fd>`; returns the process and the parent's end of the connection."""
    ours, theirs = socket.socketpair()
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, TRAINER_SIGNALS)  # this thread only; inherited by the child
    try:
        proc = subprocess.Popen([sys.executable, "-m", module, str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        theirs.close()
        if log_path:
            log.close()
    return proc, Connection(ours.detach())


def kill_worker(proc: subprocess.Popen | None, conn: Connection | None) -> None:
    """SIGKILL the worker's process group, reap it, close the connection. The group is killed even when the
    worker itself has already exited: a child it started (its session's members) would otherwise be orphaned
    and outlive the job (the local launcher, a subreaper, found one at the end of a 250-step main job)."""
    if proc is not None:
        if proc.returncode is None:  # not reaped yet, so its pid (the group's id) cannot have been reused
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # workers lead their own session: pgid == pid
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait(timeout=30)
    if conn is not None:
        conn.close()


def ignore_trainer_signals() -> None:
    """In a worker: ignore the trainer's pre-emption signals, then unblock them (spawn_worker blocked them, so
    none that arrived during start-up is lost to the default action; pending ones are discarded now)."""
    for sig in TRAINER_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, TRAINER_SIGNALS)


def worker_connection(argv: list[str]) -> Connection:
    """The worker's end, from its command line; first makes the worker ignore the trainer's signals."""
    ignore_trainer_signals()
    return Connection(int(argv[0]))


class WorkerPoolBase:
    """Context-manager plumbing shared by the pools: `close()` on exit and when garbage-collected."""

    def close(self) -> None:
        raise NotImplementedError  # each pool defines how its workers end

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass
