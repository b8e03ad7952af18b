"""Start N local trainer ranks when `megahybrid train` is run outside torchrun (the laptop / CI path), N = 1 included.

Why not exec torchrun: its agent turns a SIGTERM into a worker kill and a non-zero exit, while pre-emption must
let every rank checkpoint and exit 0. This launcher forwards SIGTERM/SIGUSR1 to the ranks, waits for them, and
fails fast: when one rank fails, it says which rank and how (a signal, and for SIGKILL whether memory ran out),
stops the others and returns that rank's exit code (128 + N for signal N). It is a child subreaper, so the engines
and reward workers of a rank that was killed (they run in sessions of their own) come back to it and are stopped:
no process outlives the job. A one-rank run goes through it too (a trainer killed by the OOM killer cannot say so
itself); its rank is a world of 1 (torch.distributed over a local TCP store) with the launcher's own environment.
On a cluster, Slurm + torchrun (slurm/common.sh) set RANK/WORLD_SIZE and this module is not used.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from megahybrid.parallel.process_report import children_map, describe_exit, descendants, oom_kill_count, rss_bytes

EXIT_CONFIG_ERROR = 2
"""cli.EXIT_CONFIG_ERROR: the exit code of a config or data error, which rank 0 reports in words itself."""
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
PR_SET_PDEATHSIG = 1
LAUNCHER_PID_ENV = "MEGAHYBRID_LAUNCHER_PID"
"""Set in each rank's environment: the launcher's pid (see `die_with_launcher`)."""
FULL_DISK_BYTES = 64 << 20
"""A file system with less free space than this (or than 5% of its size, if smaller) counts as full: a write
that failed there most likely failed for want of space (a checkpoint is tens of MiB even for a tiny model)."""


def under_distributed_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(world_size: int, argv: list[str], *, poll_s: float = 0.2) -> int:
    """Run `python -m megahybrid <argv>` as `world_size` ranks with torch.distributed env vars; return exit code."""
    port = free_port()
    # one share of the cores per rank: torch's default (all cores in every rank) oversubscribes the CPU and
    # OpenMP's spinning makes a 2-rank run on 2 cores several times slower. One rank keeps the environment as it
    # is (torch's default: all cores), as when it trained in this process
    threads = {}
    if world_size > 1:
        threads["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1)
                                                                                // world_size))
    become_subreaper()  # before any rank starts, so that even an early rank's orphans come back to us
    procs: list[subprocess.Popen] = []
    for rank in range(world_size):
        env = dict(os.environ, **threads, RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), **{LAUNCHER_PID_ENV: str(os.getpid())})
        procs.append(subprocess.Popen([sys.executable, "-m", "megahybrid", *argv], env=env))
    return supervise(procs, poll_s=poll_s, watch_dirs=_run_dirs(argv))


def _run_dirs(argv: list[str]) -> list[str]:
    """The directories a `train` run writes (checked for a full disk when a rank fails)."""
    if not argv or argv[0] != "train" or len(argv) < 2:
        return []
    try:
        from megahybrid.config.loader import load_config

        cfg = load_config(argv[1], argv[2:])
    except Exception:  # the ranks report a bad config themselves
        return []
    return [d for d in (cfg.train.run_dir, cfg.rollout.sync_dir) if d]


def full_disk_hint(dirs: list[str]) -> str | None:
    """A message when a directory's file system is (nearly) full: a write there has most likely just failed."""
    for d in dirs:
        path = Path(d).absolute()
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            usage = shutil.disk_usage(path)
        except OSError:
            continue
        if usage.free < min(FULL_DISK_BYTES, usage.total // 20):
            return (f"the file system of {d} is full ({usage.free >> 10} KiB free of {usage.total >> 20} MiB): "
                    "a write there failed. Free space, then run the same command again: resume: auto continues "
                    "from the newest complete checkpoint (a partial one is ignored)")
    return None


def die_with_launcher() -> None:
    """In a rank started by `launch`: be killed (SIGKILL) when the launcher dies, e.g. `kill -9` of the
    `megahybrid train` process, as a trainer inside that process died with it; a rank left behind would go on
    training, watched by no one. Its engines and reward workers then see the closed connection and exit. Call it
    first thing in the rank. Linux only; elsewhere (or outside a launched rank) it does nothing."""
    launcher = os.environ.pop(LAUNCHER_PID_ENV, None)  # for this process only, not for its engines' children
    if launcher is None:
        return
    try:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):  # the launcher died before the death signal was armed
        os.kill(os.getpid(), signal.SIGKILL)


def become_subreaper() -> bool:
    """Make processes orphaned below us (a killed rank's engines and reward workers, which run in sessions of
    their own) our children instead of init's, so that `reap_orphans` can find and stop them. Linux only."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def supervise(procs: list[subprocess.Popen], *, poll_s: float = 0.2, grace_s: float = 10.0,
              stop_timeout_s: float = 30.0, watch_dirs: list[str] = ()) -> int:
    """Wait for the ranks `procs` (rank i = procs[i]); forward signals; fail fast and say why a rank died.

    Returns 0 when every rank exits 0; otherwise the failed rank's code, 128 + N for death by signal N.
    """
    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    memory = _MemoryWatch(procs)
    # children of ours from before (a test's own helpers) are not orphans of the ranks
    before = set(children_map().get(os.getpid(), [])) - {p.pid for p in procs}
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                return _fail(procs, failed, memory, grace_s, stop_timeout_s, list(watch_dirs))
            if all(c == 0 for c in codes):
                return 0
            memory.sample()
            time.sleep(poll_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        reap_orphans(procs, exclude=before)


def _fail(procs, failed: list[int], memory: "_MemoryWatch", grace_s: float, stop_timeout_s: float,
          watch_dirs: list[str]) -> int:
    # fail fast: one rank's error would leave the others blocked in a collective forever. The grace lets them
    # notice the broken connection (or finish reporting their own error) and close their engines themselves;
    # SIGTERM is not sent, since it asks a rank to checkpoint (pre-emption), and a checkpoint needs every rank
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    # every rank that failed by now, a signal death first: ranks that exit 1 next to it are usually its victims
    failed += [r for r, p in enumerate(procs) if p.poll() not in (None, 0) and r not in failed]
    failed.sort(key=lambda r: procs[r].returncode >= 0)
    for r in failed:
        p = procs[r]
        if r == 0 and p.returncode == EXIT_CONFIG_ERROR:
            continue  # rank 0 has printed its config or data error itself (cli.py), one line per problem
        print(f"[megahybrid] {describe_exit(f'trainer rank {r}', p.pid, p.returncode, **memory.report(r))}",
              file=sys.stderr, flush=True)
    hint = full_disk_hint(watch_dirs)
    if hint:
        print(f"[megahybrid] {hint}", file=sys.stderr, flush=True)
    alive = [r for r, p in enumerate(procs) if p.poll() is None]
    if alive:
        print(f"[megahybrid] stopping ranks {', '.join(map(str, alive))}", file=sys.stderr, flush=True)
    for r in alive:
        procs[r].kill()
    for p in procs:
        try:
            p.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            pass
    code = procs[failed[0]].returncode
    return 128 - code if code < 0 else code


def reap_orphans(procs: list[subprocess.Popen], exclude: set[int] = frozenset()) -> int:
    """SIGKILL (with their process groups) and reap every child of ours that is not a rank (nor in `exclude`):
    the engines and reward workers of ranks that died before closing them. Returns how many there were."""
    skip = {p.pid for p in procs} | set(exclude)
    orphans = [pid for pid in children_map().get(os.getpid(), []) if pid not in skip]
    live = [pid for pid in orphans if not _is_zombie(pid)]  # zombies are only reaped, not reported
    for pid in orphans:
        try:
            # workers lead their own session (and process group): the group holds their children too
            os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    for pid in orphans:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    if live:
        print(f"[megahybrid] stopped {len(live)} orphaned engine/reward process(es): "
              f"{', '.join(map(str, live))}", file=sys.stderr, flush=True)
    return len(live)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


class _MemoryWatch:
    """Peak resident memory of each rank (with its engines and reward workers) and of the whole job, sampled
    about once a second: a process killed by the OOM killer cannot report its own size afterwards."""

    def __init__(self, procs: list[subprocess.Popen], every_s: float = 1.0):
        self.procs, self.every_s, self.next_t = procs, every_s, 0.0
        self.peak = [0] * len(procs)
        self.job_peak = 0
        self.oom_kills_before = oom_kill_count()

    def sample(self) -> None:
        if time.monotonic() < self.next_t:
            return
        self.next_t = time.monotonic() + self.every_s
        children = children_map()
        job = 0
        for r, p in enumerate(self.procs):
            rss = sum(rss_bytes(pid) for pid in [p.pid, *descendants(p.pid, children)])
            self.peak[r] = max(self.peak[r], rss)
            job += rss
        self.job_peak = max(self.job_peak, job)

    def report(self, rank: int) -> dict:
        return {"peak_rss": self.peak[rank], "job_rss": self.job_peak, "oom_kills_before": self.oom_kills_before}
