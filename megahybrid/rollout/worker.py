"""Rollout worker process: owns one VLLMEngine and answers requests from RolloutPool over a socket.

Started by the pool as `python -m megahybrid.rollout.worker <fd>` (a fresh interpreter, so the environment -
OMP_NUM_THREADS, VLLM_ENABLE_V1_MULTIPROCESSING, CUDA_VISIBLE_DEVICES - is set before torch or vLLM load).

Protocol (pickled tuples): first `("init", engine_kwargs, weights_path | None, weights_version)` ->
`("ready", health)`; then `(command, request_id, *args)` -> `("ok", request_id, result, weights_version)` or
`("error", request_id, traceback)`.
The process exits on `("close",)` or when the pool's end of the socket closes.
"""
from __future__ import annotations

import os
import sys
import traceback
from multiprocessing.connection import Connection

from megahybrid.rewards.subproc import worker_connection


def _handle(engine, cmd: str, args: tuple):
    if cmd == "generate":
        prompts, n, sampling, seeds = args
        return engine.generate(prompts, n, sampling, request_seeds=seeds)
    if cmd == "update_weights":
        return engine.update_weights(*args)
    if cmd == "init_sync":
        return engine.init_sync_group(*args)
    if cmd == "receive_weights":
        return engine.receive_weights(*args)
    if cmd == "health":
        return engine.health()
    raise ValueError(f"unknown rollout worker command {cmd!r}")


def serve(conn: Connection) -> None:
    from megahybrid.rollout.types import SamplingOptions
    from megahybrid.rollout.vllm_engine import VLLMEngine

    _, engine_kwargs, weights_path, version = conn.recv()
    engine = VLLMEngine(**engine_kwargs)
    if weights_path is not None:
        engine.update_weights(weights_path, version)
    # the first generate pays one-off kernel set-up (seconds on a loaded CPU): pay it before reporting ready
    # so that request timeouts measure generation only
    engine.generate([[0]], 1, SamplingOptions(max_new_tokens=1, seed=0, logprobs=False))
    conn.send(("ready", engine.health()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break  # the pool is gone
        if msg[0] == "close":
            break
        cmd, req_id, *args = msg
        try:
            # every reply names the weights it was computed with (the pool checks generate replies against the
            # version it sent last)
            reply = ("ok", req_id, _handle(engine, cmd, tuple(args)), engine.weights_version)
        except Exception:  # reported to the pool, which raises it with this worker's traceback
            reply = ("error", req_id, traceback.format_exc())
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            break
    if not engine.in_process:  # GPU engines own child processes; in-process CPU engines end with this process
        engine.close()


def main(argv: list[str]) -> None:
    conn = worker_connection(argv)
    try:
        serve(conn)
    except Exception:
        try:
            conn.send(("fatal", None, traceback.format_exc()))
        except OSError:
            pass
        raise
    finally:
        conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # in-process vLLM leaves non-daemon threads behind that would hold the interpreter open


if __name__ == "__main__":
    main(sys.argv[1:])
