"""RolloutPool: N engine worker processes behind one `generate` call.

Prompts are split into one contiguous shard per worker; results come back in prompt order. A shard whose
worker dies or exceeds `request_timeout_s` is resubmitted whole to a restarted worker (a shard's results are
only accepted as one reply, so nothing is lost or duplicated), and because every prompt samples with its own
seed (`SamplingOptions.request_seeds`) the resubmitted shard gives the same samples.

Weights: `update_weights(hf_dir)` makes every engine reload a shared safetensors folder (works across
nodes); `broadcast_weights(named_tensors)` sends them over a torch.distributed group whose rank 0 is this
process (the trainer's rank 0) and whose other ranks are the engines (gloo on CPU, NCCL on GPU).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from megahybrid.config.schema import RolloutConfig
from megahybrid.parallel.process_report import describe_exit
from megahybrid.rewards.subproc import WorkerPoolBase, kill_worker, spawn_worker
from megahybrid.rollout.types import RolloutError, RolloutSample, SamplingOptions
from megahybrid.rollout.vllm_engine import cpu_env


SYNC_GROUP_TIMEOUT_S = 120.0
"""Longest wait to form the broadcast group or for one collective on it (our choice)."""


@dataclass
class _Slot:
    index: int
    log_path: str
    proc: subprocess.Popen | None = None
    conn: Connection | None = None
    state: str = "dead"
    """starting | idle | busy | dead"""
    shard: int | None = None
    deadline: float = 0.0
    start_failures: int = 0
    """Consecutive failed starts (the pool gives up after max_attempts)."""
    stale: bool = False
    """Broadcast mode: restarted after the last broadcast, so its weights are old (no work until re-synced)."""
    info: dict = field(default_factory=dict)


class RolloutPool(WorkerPoolBase):
    """`RolloutEngine` over `cfg.num_workers` VLLMEngine worker processes on this node.

    `model_dir`: HF folder (config, safetensors, tokenizer). `seed`: vLLM engine seed. `max_model_len`: prompt +
    response tokens. `log_dir`: one `worker<i>.log` per worker (default: a fresh temp dir). `gpu_ids`: GPUs to
    hand out, `cfg.gpus_per_worker` each in order (default 0, 1, ...). `dtype`: engine dtype (CPU: float32).
    `prefix_caching`: vLLM prefix caching (default: on with GPUs, off on CPU).
    """

    def __init__(self, cfg: RolloutConfig, model_dir: str, *, seed: int, max_model_len: int,
                 log_dir: str | None = None, start_timeout_s: float = 600.0, max_attempts: int = 3,
                 gpu_ids: list[int] | None = None, dtype: str | None = None,
                 prefix_caching: bool | None = None):
        if cfg.num_workers < 1:
            raise ValueError(f"rollout.num_workers: expected >= 1, got {cfg.num_workers}")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise RolloutError(f"rollout model folder {model_dir!r} has no config.json (a Hugging Face folder "
                               "with config, safetensors and tokenizer files is expected)")
        self.cfg, self.model_dir = cfg, model_dir
        self.start_timeout_s, self.max_attempts = start_timeout_s, max_attempts
        self.cuda = cfg.gpus_per_worker > 0
        self._engine_kwargs = dict(model_dir=model_dir, max_model_len=max_model_len, seed=seed,
                                   device="cuda" if self.cuda else "cpu",
                                   kv_cache_memory_bytes=cfg.kv_cache_memory_bytes, max_num_seqs=cfg.max_num_seqs,
                                   gpu_memory_utilization=cfg.gpu_memory_utilization,
                                   tensor_parallel_size=max(1, cfg.gpus_per_worker), dtype=dtype,
                                   # off on CPU: a warm cache changes how a prompt's KV is computed, and bit-exact
                                   # samples (exact resume) matter more there than the saved prefill
                                   enable_prefix_caching=self.cuda if prefix_caching is None else prefix_caching)
        g = cfg.gpus_per_worker
        self._gpu_ids = gpu_ids if gpu_ids is not None else list(range(cfg.num_workers * g))
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="megahybrid-rollout-")
        os.makedirs(self.log_dir, exist_ok=True)
        self._slots = [_Slot(i, os.path.join(self.log_dir, f"worker{i}.log")) for i in range(cfg.num_workers)]
        self._weights_path: str | None = None
        self._last_broadcast: dict[str, Tensor] | None = None
        self._group = None
        self._group_members: tuple | None = None
        self.weights_version = 0
        self.num_restarts = self.num_timeouts = 0
        self.last_sync_s = 0.0
        self._closed = False
        try:
            for s in self._slots:
                self._spawn(s)
            self._wait_started(strict=True)
        except BaseException:
            self.close()  # no worker outlives a failed start
            raise

    # ----- processes -------------------------------------------------------------------------------------------
    def _env(self, slot: _Slot) -> dict[str, str]:
        env = dict(os.environ)
        if self.cuda:
            g = self.cfg.gpus_per_worker
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in self._gpu_ids[slot.index * g:(slot.index + 1) * g])
        else:
            env.update(cpu_env())
        return env

    def _spawn(self, slot: _Slot) -> None:
        slot.proc, slot.conn = spawn_worker("megahybrid.rollout.worker", env=self._env(slot), log_path=slot.log_path)
        # a folder holds the current version; without one (broadcast) the worker starts at the initial weights
        # (version 0) and is re-sent the current ones before it gets work
        version = self.weights_version if self._weights_path is not None else 0
        slot.conn.send(("init", self._engine_kwargs, self._weights_path, version))
        slot.state, slot.shard, slot.deadline = "starting", None, time.monotonic() + self.start_timeout_s
        # weights that arrived by broadcast are not on disk: a restarted worker needs a re-send
        slot.stale = self._weights_path is None and self.weights_version > 0

    def _kill(self, slot: _Slot) -> None:
        kill_worker(slot.proc, slot.conn)
        slot.proc, slot.conn, slot.state, slot.shard = None, None, "dead", None

    def _restart(self, slot: _Slot) -> None:
        self._kill(slot)
        self.num_restarts += 1
        self._spawn(slot)

    def _log_tail(self, slot: _Slot, n: int = 3000) -> str:
        try:
            return Path(slot.log_path).read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    @staticmethod
    def _death(slot: _Slot) -> str:
        """How a worker whose connection closed ended (its signal, and for SIGKILL whether memory ran out)."""
        try:
            code = slot.proc.wait(timeout=5)  # the connection closes a moment before the process is gone
        except subprocess.TimeoutExpired:
            return f"(pid {slot.proc.pid}) closed its connection"
        return describe_exit("", slot.proc.pid, code).strip()

    @staticmethod
    def _recv(slot: _Slot) -> tuple | None:
        try:
            return slot.conn.recv()
        except (EOFError, OSError):
            return None

    def _on_start_message(self, slot: _Slot, msg: tuple | None, strict: bool) -> None:
        if msg is not None and msg[0] == "ready":
            slot.state, slot.info, slot.start_failures = "idle", msg[1], 0
            return
        detail = msg[2] if msg is not None and msg[0] == "fatal" else self._log_tail(slot)
        slot.start_failures += 1
        if strict or slot.start_failures >= self.max_attempts:
            raise RolloutError(f"rollout worker {slot.index} failed to start (log {slot.log_path}):\n{detail}")
        self._restart(slot)

    def _wait_started(self, strict: bool) -> None:
        """Wait until no worker is starting (strict: any start failure raises with the worker's log)."""
        while True:
            starting = [s for s in self._slots if s.state == "starting"]
            if not starting:
                return
            timeout = max(0.0, min(s.deadline for s in starting) - time.monotonic())
            ready = wait([s.conn for s in starting], timeout=timeout)
            for s in starting:
                if s.conn in ready:
                    self._on_start_message(s, self._recv(s), strict)
                elif time.monotonic() > s.deadline:
                    if strict:
                        self._kill(s)
                        raise RolloutError(f"rollout worker {s.index} did not start within "
                                           f"{self.start_timeout_s:.0f} s (log {s.log_path}):\n{self._log_tail(s)}")
                    self._restart(s)

    # ----- generation ------------------------------------------------------------------------------------------
    def generate(self, prompt_token_ids: list[list[int]], n: int, sampling: SamplingOptions, *,
                 seed_offset: int = 0) -> list[list[RolloutSample]]:
        """n samples per prompt, in prompt order (see the module docstring for failures and determinism).

        `seed_offset`: index of the first prompt in the whole request when this pool serves one node's share of
        it, so that a prompt's seed never depends on which node or engine samples it."""
        self._check_open()
        P = len(prompt_token_ids)
        if P == 0:
            return []
        seeds = sampling.request_seeds(P, offset=seed_offset)
        k = min(len(self._slots), P)
        bounds = [(i * P // k, (i + 1) * P // k) for i in range(k)]
        queue, attempts = deque(range(k)), [0] * k
        results: list[list[RolloutSample] | None] = [None] * P
        try:
            while queue or any(s.state == "busy" for s in self._slots):
                self._maybe_resync()
                for slot in self._slots:
                    if queue and slot.state == "idle" and not slot.stale:
                        self._dispatch(slot, queue.popleft(), bounds, prompt_token_ids, n, sampling, seeds)
                self._collect(results, bounds, queue, attempts)
        except BaseException:
            self._drain()  # no reply of this call may leak into the next one
            raise
        return results  # type: ignore[return-value]

    def _drain(self) -> None:
        """Wait out (and discard) requests still in flight; restart workers that do not answer in time."""
        for slot in self._slots:
            if slot.state != "busy":
                continue
            if slot.conn.poll(self.cfg.request_timeout_s) and self._recv(slot) is not None:
                slot.state, slot.shard = "idle", None
            else:
                self._restart(slot)

    def _dispatch(self, slot, shard, bounds, prompts, n, sampling, seeds) -> None:
        a, b = bounds[shard]
        slot.state, slot.shard = "busy", shard
        slot.deadline = time.monotonic() + self.cfg.request_timeout_s
        try:
            slot.conn.send(("generate", shard, [list(p) for p in prompts[a:b]], n, sampling, seeds[a:b]))
        except OSError:
            pass  # dead worker: noticed as EOF by _collect, which resubmits the shard

    def _requeue(self, slot: _Slot, queue: deque, attempts: list[int], why: str) -> None:
        shard = slot.shard
        attempts[shard] += 1
        if attempts[shard] >= self.max_attempts:
            raise RolloutError(f"rollout shard {shard} failed {attempts[shard]} times (last: worker {slot.index} "
                               f"{why}; log {slot.log_path}):\n{self._log_tail(slot)}")
        queue.appendleft(shard)
        print(f"[megahybrid] rollout worker {slot.index} {why}; restarting it and resubmitting shard {shard} "
              f"(attempt {attempts[shard] + 1} of {self.max_attempts})", file=sys.stderr, flush=True)
        self._restart(slot)

    def _collect(self, results, bounds, queue: deque, attempts: list[int]) -> None:
        waiting = [s for s in self._slots if s.state in ("busy", "starting")]
        if not waiting:
            return
        timeout = max(0.0, min(s.deadline for s in waiting) - time.monotonic())
        ready = wait([s.conn for s in waiting], timeout=timeout)
        now = time.monotonic()
        for slot in waiting:
            if slot.conn in ready:
                msg = self._recv(slot)
                if slot.state == "starting":
                    self._on_start_message(slot, msg, strict=False)
                elif msg is None:
                    self._requeue(slot, queue, attempts, self._death(slot))
                elif msg[0] == "ok":
                    slot.state, slot.shard, shard = "idle", None, msg[1]  # answered: idle, whatever the check says
                    self._check_version(slot, msg[3])
                    a, b = bounds[shard]
                    results[a:b] = msg[2]
                else:  # the engine raised: a deterministic error that a retry would repeat
                    slot.state, slot.shard = "idle", None
                    raise RolloutError(f"rollout worker {slot.index} failed:\n{msg[2]}")
            elif now > slot.deadline:
                if slot.state == "starting":
                    self._restart(slot)
                else:
                    self.num_timeouts += 1
                    self._requeue(slot, queue, attempts, f"exceeded request_timeout_s={self.cfg.request_timeout_s}")

    def _check_version(self, slot: _Slot, engine_version: int) -> None:
        """Every generate reply says which weights sampled it; a mismatch is the silent skipped sync (a worker
        that missed an update) and is never trained on."""
        if engine_version != self.weights_version:
            raise RolloutError(f"rollout worker {slot.index} sampled with weights version {engine_version}, but "
                               f"version {self.weights_version} was sent to the engines (a weight sync did not reach "
                               f"it; log {slot.log_path}): stopping instead of training on samples of stale weights")

    # ----- control requests and weight sync --------------------------------------------------------------------
    def _revive(self) -> None:
        """Restart workers that died while idle, and wait until none is starting."""
        for s in self._slots:
            if s.proc is None or s.proc.poll() is not None:
                self._restart(s)
        self._wait_started(strict=False)

    def _control(self, cmd: str, args_for: Callable[[_Slot], tuple] = lambda s: (), *,
                 before_wait: Callable[[], None] | None = None, died_ok: bool = False) -> list[Any]:
        """Send one command to every worker and gather every reply (in worker order) before raising.

        `before_wait` runs between sending and gathering (the trainer's half of a collective). With `died_ok`, a
        worker that dies on the command is only restarted (its restart loads the state the command set up).
        """
        self._revive()
        for s in self._slots:
            try:
                s.conn.send((cmd, 0, *args_for(s)))
            except OSError:
                pass  # a dead worker: seen below as no reply
        failure: BaseException | None = None
        if before_wait is not None:
            try:
                before_wait()
            except Exception as exc:  # still gather the replies, so none leaks into a later request
                failure = exc
        out, errors = [], []
        for s in self._slots:
            msg = self._recv(s) if s.conn.poll(self.cfg.request_timeout_s) else None
            if msg is not None and msg[0] == "ok":
                out.append(msg[2])
                continue
            detail = msg[2] if msg is not None else f"no reply (died or timed out); log:\n{self._log_tail(s)}"
            if msg is None:
                print(f"[megahybrid] rollout worker {s.index} gave no reply to {cmd} within request_timeout_s="
                      f"{self.cfg.request_timeout_s} (hung or died); restarting it", file=sys.stderr, flush=True)
            self._restart(s)
            out.append(None)
            if msg is not None or not died_ok:
                errors.append(f"worker {s.index} ({s.log_path}): {detail}")
        if errors or failure is not None:
            raise RolloutError(f"rollout {cmd} failed:\n" + "\n".join(errors or [repr(failure)])) from failure
        return out

    def update_weights(self, source: str | dict[str, Tensor]) -> float:
        """Make every engine load new weights; returns the wall seconds of the sync.

        A folder of Hugging Face safetensors (`dir` sync); restarted workers load it too. A dict of named
        tensors goes through the broadcast group (`broadcast_weights`).
        """
        if not isinstance(source, str):
            return self.broadcast_weights(source)
        self._check_open()
        t0 = time.perf_counter()
        self._weights_path = os.path.abspath(source)
        self._last_broadcast = None
        version = self.weights_version + 1
        self.weights_version = version  # before the command: a worker that dies on it restarts at this version
        self._control("update_weights", lambda s: (self._weights_path, version), died_ok=True)
        for s in self._slots:
            s.stale = False
        self.last_sync_s = time.perf_counter() - t0
        return self.last_sync_s

    def broadcast_weights(self, named_tensors: dict[str, Tensor], *, keep_copy: bool = True) -> float:
        """Broadcast HF-named tensors from this process (rank 0) to every engine; returns seconds.

        With `keep_copy` a CPU copy is kept so that a worker restarted later is re-synced before it gets work
        (memory: one copy of the weights on this process).
        """
        self._check_open()
        t0 = time.perf_counter()
        self._wait_started(strict=False)
        version = self.weights_version + 1
        self._broadcast_retrying(named_tensors, version)
        self._last_broadcast = {k: v.detach().to("cpu", copy=True) for k, v in named_tensors.items()} \
            if keep_copy else None
        self._weights_path = None
        self.weights_version = version
        self.last_sync_s = time.perf_counter() - t0
        return self.last_sync_s

    def _broadcast_retrying(self, named_tensors: dict[str, Tensor], version: int) -> None:
        """A worker that dies while the sync group forms or while weights stream breaks the collective for every
        member: restart the broken workers (the failed `_control` already did), form a new group, send again."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                return self._broadcast(named_tensors, version)
            except (RolloutError, RuntimeError) as exc:
                self._group = None  # never reuse a group a collective failed on
                if attempt == self.max_attempts:
                    raise
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                print(f"[megahybrid] weight broadcast failed ({first[:200]}); restarting the broken rollout "
                      f"workers and sending again (attempt {attempt + 1} of {self.max_attempts})",
                      file=sys.stderr, flush=True)

    def _broadcast(self, named_tensors: dict[str, Tensor], version: int) -> None:
        from megahybrid.rollout.vllm_ext import broadcast_tensor, plan_buckets

        self._ensure_group()
        device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        buckets = plan_buckets(named_tensors, self.cfg.sync_bucket_mb << 20)

        def send_all():
            for _dtype, members in buckets:  # one flat buffer a bucket: few, large collectives
                flat = torch.cat([named_tensors[name].detach().reshape(-1) for name, _ in members])
                broadcast_tensor(self._group, flat.to(device))

        self._control("receive_weights", lambda s: (buckets, version), before_wait=send_all)
        for s in self._slots:
            s.stale = False

    def _ensure_group(self) -> None:
        """(Re)build the broadcast group when it does not exist or a worker was restarted since."""
        from megahybrid.rollout.vllm_ext import make_sync_group

        self._revive()
        members = tuple(s.proc.pid for s in self._slots)
        if self._group is not None and self._group_members == members:
            return
        tp = max(1, self.cfg.gpus_per_worker)
        world = 1 + tp * len(self._slots)
        with socket.socket() as sock:  # a free port for the group's store
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        backend = "nccl" if self.cuda else "gloo"
        groups = {}

        def join():
            groups["g"] = make_sync_group("127.0.0.1", port, 0, world, backend, timeout_s=timeout)

        # a short timeout for forming the group and for each collective on it: a member that died meanwhile then
        # fails the others within minutes, not request_timeout_s (a bucket takes well under a second)
        timeout = min(self.cfg.request_timeout_s, SYNC_GROUP_TIMEOUT_S)
        self._control("init_sync", lambda s: ("127.0.0.1", port, 1 + tp * s.index, world, backend, timeout),
                      before_wait=join)
        self._group, self._group_members = groups["g"], members

    def _maybe_resync(self) -> None:
        """Broadcast mode: once a restarted (stale) worker is up and no request is in flight, re-send the last
        weights to everyone (a group collective). Until then the stale worker gets no work; others carry on."""
        if not any(s.stale and s.state == "idle" for s in self._slots):
            return
        if any(s.state == "busy" for s in self._slots):
            return
        if self._last_broadcast is None:
            raise RolloutError("a rollout worker restarted after broadcast_weights(keep_copy=False): "
                               "its weights are stale; call broadcast_weights again")
        self._broadcast_retrying(self._last_broadcast, self.weights_version)

    def wait_ready(self) -> None:
        """Block until every worker is started and has the current weights (restarts finished, re-syncs done)."""
        self._check_open()
        self._revive()
        self._maybe_resync()

    # ----- misc -----------------------------------------------------------------------------------------------
    def pids(self) -> list[int | None]:
        """Worker process ids (tests use them to inject faults)."""
        return [s.proc.pid if s.proc is not None else None for s in self._slots]

    def busy_workers(self) -> list[int]:
        """Indices of workers with a generate request in flight."""
        return [s.index for s in self._slots if s.state == "busy"]

    def health(self) -> dict:
        return {"num_workers": len(self._slots), "states": [s.state for s in self._slots],
                "alive": [s.proc is not None and s.proc.poll() is None for s in self._slots],
                "num_restarts": self.num_restarts, "num_timeouts": self.num_timeouts,
                "weights_version": self.weights_version, "log_dir": self.log_dir}

    def metrics(self) -> dict[str, float]:
        return {"rollout/restarts": float(self.num_restarts), "rollout/timeouts": float(self.num_timeouts),
                "rollout/weight_sync_s": self.last_sync_s}

    def _check_open(self) -> None:
        if self._closed:
            raise RolloutError("RolloutPool is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self._slots:
            if s.conn is not None:
                try:
                    s.conn.send(("close",))
                except OSError:
                    pass
        deadline = time.monotonic() + 5  # grace period, then SIGKILL
        for s in self._slots:
            if s.proc is not None:
                try:
                    s.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            self._kill(s)
        self._group = None
