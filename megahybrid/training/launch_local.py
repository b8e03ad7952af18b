"""Start N local trainer ranks when `megahybrid train` is run outside torchrun (the laptop / CI path).

Why not exec torchrun: its agent turns a SIGTERM into a worker kill and a non-zero exit, while pre-emption must
let every rank checkpoint and exit 0. This launcher forwards SIGTERM/SIGUSR1 to the ranks, waits for them, and
fails fast: when one rank dies with an error the others are terminated and the worst exit code is returned.
On a cluster, Slurm + torchrun (slurm/common.sh) set RANK/WORLD_SIZE and this module is not used.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def under_distributed_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(world_size: int, argv: list[str], *, poll_s: float = 0.2) -> int:
    """Run `python -m megahybrid <argv>` as `world_size` ranks with torch.distributed env vars; return exit code."""
    port = free_port()
    procs: list[subprocess.Popen] = []
    # one share of the cores per rank: torch's default (all cores in every rank) oversubscribes the CPU and
    # OpenMP's spinning makes a 2-rank run on 2 cores several times slower
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // world_size))
    for rank in range(world_size):
        env = dict(os.environ, OMP_NUM_THREADS=threads, RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "megahybrid", *argv], env=env))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                # fail fast: one rank's error would leave the others blocked in a collective forever
                time.sleep(2.0)
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                for p in procs:
                    try:
                        p.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        p.kill()
                return max(abs(c) for c in failed)
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
