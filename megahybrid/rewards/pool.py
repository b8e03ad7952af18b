"""RewardPool: score responses in worker processes with a per-check time limit.

Each check runs in a worker's main thread under a timer of `timeout_s` (Math-Verify's own signal.alarm timeouts
are off). A worker that does not answer within `timeout_s + grace_s` (stuck in C code) or dies (a crash in a
parser) is SIGKILLed and restarted; its check scores 0. Timeouts are counted (`reward/timeouts`), and so are
crashes and exceptions (`reward/errors`).
"""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from subprocess import Popen, TimeoutExpired

from megahybrid.config.schema import RewardConfig
from megahybrid.parallel.process_report import describe_exit
from megahybrid.rewards.functions import REWARD_NAMES, exact_reward, format_reward, kk_reward
from megahybrid.rewards.subproc import WorkerPoolBase, kill_worker, spawn_worker

IN_PROCESS = {"exact": exact_reward, "kk": kk_reward}
"""Rewards cheap and safe enough to run in the caller (linear string checks, no SymPy)."""


@dataclass
class RewardResult:
    scores: list[float]
    """Total reward per response: the main reward + format_coef * format."""
    num_timeouts: int = 0
    """Checks that hit the time limit (scored 0)."""
    num_errors: int = 0
    """Checks that raised or crashed their worker (scored 0)."""
    format_scores: list[float] = field(default_factory=list)
    """The 0/1 `format` reward per response (computed only when format_coef != 0)."""

    def metrics(self) -> dict[str, float]:
        n = max(1, len(self.scores))
        return {"reward/mean": sum(self.scores) / n, "reward/timeouts": float(self.num_timeouts),
                "reward/errors": float(self.num_errors)}


@dataclass
class _Worker:
    proc: Popen | None = None
    conn: Connection | None = None
    ready: bool = False
    job: int | None = None
    deadline: float = 0.0
    start_failures: int = 0
    """Consecutive deaths before "ready" (a restart may die too, e.g. killed while importing)."""


class RewardPool(WorkerPoolBase):
    """`RewardPool(cfg.reward).score(responses, references) -> RewardResult`."""

    def __init__(self, cfg: RewardConfig, *, srl_require_think: bool = True, think_opened_in_prompt: bool = False,
                 grace_s: float = 2.0, start_timeout_s: float = 120.0):
        if cfg.name not in REWARD_NAMES:
            raise ValueError(f"reward.name: expected one of {', '.join(REWARD_NAMES)}, got {cfg.name!r}")
        if cfg.timeout_s <= 0:
            raise ValueError(f"reward.timeout_s: expected > 0, got {cfg.timeout_s}")
        self.cfg, self.grace_s, self.start_timeout_s = cfg, grace_s, start_timeout_s
        self.opts = {"require_think": srl_require_think}
        self.think_opened_in_prompt = think_opened_in_prompt
        self.num_restarts = 0
        self._queue: deque[int] = deque()
        self._crashes: list[int] = []
        self._workers: list[_Worker] = []
        if cfg.name not in IN_PROCESS:
            self._workers = [_Worker() for _ in range(max(1, cfg.num_workers))]
            for w in self._workers:
                self._start(w)

    # ----- workers --------------------------------------------------------------------------------------------
    def _start(self, w: _Worker) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        w.proc, w.conn = spawn_worker("megahybrid.rewards.worker", env=env)
        w.ready, w.job, w.deadline = False, None, time.monotonic() + self.start_timeout_s

    def _restart(self, w: _Worker) -> None:
        kill_worker(w.proc, w.conn)
        self.num_restarts += 1
        self._start(w)

    def pids(self) -> list[int | None]:
        return [w.proc.pid if w.proc else None for w in self._workers]

    # ----- scoring --------------------------------------------------------------------------------------------
    def score(self, responses: list[str], references: list[str]) -> RewardResult:
        if len(responses) != len(references):
            raise ValueError(f"score: {len(responses)} responses but {len(references)} references")
        if self.cfg.name in IN_PROCESS:
            fn = IN_PROCESS[self.cfg.name]
            result = RewardResult([fn(r, ref) for r, ref in zip(responses, references)])
        else:
            result = self._score_in_workers(responses, references)
        if self.cfg.format_coef:
            result.format_scores = [format_reward(r, opened_in_prompt=self.think_opened_in_prompt)
                                    for r in responses]
            result.scores = [s + self.cfg.format_coef * f for s, f in zip(result.scores, result.format_scores)]
        return result

    def _score_in_workers(self, responses: list[str], references: list[str]) -> RewardResult:
        result = RewardResult([0.0] * len(responses))
        self._queue, self._crashes = deque(range(len(responses))), [0] * len(responses)
        while self._queue or any(w.job is not None for w in self._workers):
            for w in self._workers:
                if self._queue and w.ready and w.job is None:
                    self._send(w, self._queue.popleft(), responses, references)
            self._collect(result)
        return result

    def _send(self, w: _Worker, job: int, responses, references) -> None:
        w.job, w.deadline = job, time.monotonic() + self.cfg.timeout_s + self.grace_s
        try:
            w.conn.send((job, self.cfg.name, responses[job], references[job], self.opts, self.cfg.timeout_s))
        except OSError:
            pass  # died while idle: seen as EOF by _collect, which retries the check

    def _collect(self, result: RewardResult) -> None:
        waiting = [w for w in self._workers if w.job is not None or not w.ready]
        if not waiting:
            return
        ready = wait([w.conn for w in waiting], timeout=max(0.0, min(w.deadline for w in waiting) - time.monotonic()))
        for w in waiting:
            if w.conn in ready:
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    msg = None
                self._handle(w, msg, result)
            elif time.monotonic() > w.deadline:  # stuck where the worker's timer cannot reach (C code)
                if w.job is None:
                    raise RuntimeError(f"reward worker did not start within {self.start_timeout_s:.0f} s")
                result.num_timeouts += 1
                print(f"[megahybrid] reward worker (pid {w.proc.pid}) gave no answer within reward.timeout_s + "
                      f"{self.grace_s:g} s (stuck where its timer cannot reach, e.g. C code): killed and restarted, "
                      "the check scores 0", file=sys.stderr, flush=True)
                self._restart(w)

    def _handle(self, w: _Worker, msg, result: RewardResult) -> None:
        if not w.ready:
            if msg is not None and msg[0] == "ready":
                w.ready, w.start_failures = True, 0
                return
            w.start_failures += 1
            if w.start_failures >= 3:  # a broken environment, not bad luck
                raise RuntimeError("reward worker failed to start (python -m megahybrid.rewards.worker): "
                                   f"{self._how_it_ended(w)}, {w.start_failures} times in a row")
            print(f"[megahybrid] {self._how_it_ended(w)} while starting; starting another", file=sys.stderr,
                  flush=True)
            self._restart(w)
            return
        if msg is None:  # the worker died: retry the check once on a fresh worker, then score it 0
            self._crashes[w.job] += 1
            if self._crashes[w.job] < 2:
                self._queue.appendleft(w.job)
            else:
                result.num_errors += 1  # it crashes every worker it meets (e.g. overflows a parser's C stack)
            retry = "retried on a fresh worker" if self._crashes[w.job] < 2 else "scored 0 (it crashed twice)"
            print(f"[megahybrid] {self._how_it_ended(w)}; restarting it, the check is {retry}", file=sys.stderr,
                  flush=True)
            self._restart(w)
            return
        job, status, score, _ = msg
        w.job = None
        result.scores[job] = score if status == "ok" else 0.0
        result.num_timeouts += status == "timeout"
        result.num_errors += status == "error"

    @staticmethod
    def _how_it_ended(w: _Worker) -> str:
        try:
            return describe_exit("reward worker", w.proc.pid, w.proc.wait(timeout=5))
        except TimeoutExpired:  # the connection closes a moment before the process is gone
            return f"reward worker (pid {w.proc.pid}) closed its connection"

    def close(self) -> None:
        for w in self._workers:  # workers hold no state worth a graceful exit
            kill_worker(w.proc, w.conn)
            w.proc = w.conn = None
        self._workers = []
