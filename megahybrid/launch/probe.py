"""Preflight probe, run under torchrun in place of training (`MEGAHYBRID_DRY_RUN=1 sbatch slurm/<recipe>.sh`).

Every rank joins the process group (the same rendezvous training uses), checks an all-reduce, checks that the
node has a GPU per local rank when CUDA is present, and writes `<out>/rank<R>.json` (host, ranks, rendezvous
address, visible GPUs) — so a new cluster, container or run directory is proven before 64 GPUs are spent.

`--wait-signal S`: each rank also waits up to S seconds for SIGUSR1 and records it, proving that the
pre-emption signal (`#SBATCH --signal=B:USR1@...`, forwarded by slurm/common.sh) reaches every rank.
`--fail-rank R`: fault injection — rank R exits with code 3 after the all-reduce while the others wait in a
barrier, proving that one rank's failure ends the whole job (srun --kill-on-bad-exit) instead of hanging it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

EXIT_INJECTED = 3
EXIT_NO_SIGNAL = 4


def _write(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(path)


def _disposition(signum: int) -> str:
    handler = signal.getsignal(signum)
    return {signal.SIG_IGN: "ignore", signal.SIG_DFL: "default"}.get(handler, "handler")


def _wait_for_usr1(seconds: float, ready: Path) -> int:
    received: list[int] = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    ready.touch()
    deadline = time.monotonic() + seconds
    while not received and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(received)


def run(out: Path, fail_rank: int | None, wait_signal: float | None) -> int:
    import torch
    import torch.distributed as dist

    # the dispositions the ranks inherit from megahybrid/launch/torchrun.py (recorded: part of the contract)
    dispositions = {name: _disposition(getattr(signal, name)) for name in ("SIGUSR1", "SIGTERM")}
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if backend == "nccl":
        if torch.cuda.device_count() < local_world:
            print(f"probe: {local_world} ranks on {socket.gethostname()} but only {torch.cuda.device_count()} "
                  f"visible GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})", file=sys.stderr)
            return 1
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank)], device="cuda" if backend == "nccl" else "cpu")
    dist.all_reduce(value)
    expected = world * (world - 1) / 2
    record = {"rank": rank, "world_size": world, "local_rank": local_rank, "local_world_size": local_world,
              "host": socket.gethostname(), "backend": backend, "all_reduce": value.item(),
              "master_addr": os.environ.get("MASTER_ADDR"), "master_port": os.environ.get("MASTER_PORT"),
              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_procid": os.environ.get("SLURM_PROCID"),
              "initial_dispositions": dispositions}
    out.mkdir(parents=True, exist_ok=True)
    if value.item() != expected:
        print(f"probe: all-reduce gave {value.item()} on rank {rank}, expected {expected}", file=sys.stderr)
        return 1
    if rank == fail_rank:
        print(f"probe: rank {rank} exits with {EXIT_INJECTED} (--fail-rank: injected failure)", file=sys.stderr)
        return EXIT_INJECTED
    if wait_signal is not None:
        record["usr1_received"] = _wait_for_usr1(wait_signal, out / f"ready{rank}")
    _write(out / f"rank{rank}.json", record)
    print(f"probe: rank {rank}/{world} on {record['host']} ok ({backend})", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    if wait_signal is not None and not record["usr1_received"]:
        print(f"probe: rank {rank} got no SIGUSR1 within {wait_signal:g} s", file=sys.stderr)
        return EXIT_NO_SIGNAL
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megahybrid.launch.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for rank<R>.json records")
    parser.add_argument("--fail-rank", type=int, default=None, help="fault injection: this rank exits 3")
    parser.add_argument("--wait-signal", type=float, default=None, metavar="S",
                        help="wait up to S seconds for SIGUSR1 on every rank")
    args = parser.parse_args(argv)
    return run(args.out, args.fail_rank, args.wait_signal)


if __name__ == "__main__":
    sys.exit(main())
