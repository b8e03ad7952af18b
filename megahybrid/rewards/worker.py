"""Reward worker process: runs checks in its main thread under a per-check timer (SIGALRM).

Started by RewardPool as `python -m megahybrid.rewards.worker <fd>`. Requests `(request_id, name, response,
reference, opts, timeout_s)` -> `(request_id, status, score, detail)` with status ok | timeout | error.
The timer interrupts Python-level work; work stuck inside C (a huge integer power) is killed by the pool.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback


class CheckTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CheckTimeout()


def serve(conn) -> None:
    from megahybrid.rewards.functions import run_check

    import math_verify  # noqa: F401  (import cost is paid before the first timed check)

    signal.signal(signal.SIGALRM, _alarm)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        req_id, name, response, reference, opts, timeout_s = msg
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            reply = (req_id, "ok", float(run_check(name, response, reference, opts)), "")
        except CheckTimeout:
            reply = (req_id, "timeout", 0.0, "")
        except Exception:  # a malformed answer must not take the worker down: scored 0, counted as an error
            reply = (req_id, "error", 0.0, traceback.format_exc(limit=5))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        conn.send(reply)


def main(argv: list[str]) -> None:
    from megahybrid.rewards.subproc import worker_connection

    conn = worker_connection(argv)
    try:
        serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main(sys.argv[1:])
