"""Benchmark: per-token log-prob + entropy of an LM head, forward + backward, on this CPU (float32).

Variants (each in a FRESH subprocess, so its peak memory is its own):
  naive  materialised logits [N, V] + log_softmax + entropy, plain autograd
  ours   megahybrid.kernels.token_logprob_entropy (impl="chunked", the CPU default)
  peer   cut-cross-entropy's torch.compile implementation (`linear_cross_entropy(..., impl="torch_compile")`);
         it returns the cross-entropy only (no entropy), so it does strictly less work than naive / ours.

Peak memory = the process's RSS high-water mark (VmHWM, reset after the inputs exist) minus its RSS then, i.e.
what the op itself adds on top of its inputs (gradients included). Time = median CPU time (time.process_time) of
fwd+bwd with one torch thread: on a shared machine CPU time is what the code costs, while wall time mostly
measures the neighbours (both are printed; ratios use CPU time).
Shapes: N=4096, D=1024, V=32768 and N=1024, D=1024, V=151936 (Qwen2.5 vocabulary).

    .venv/bin/python benchmarks/logprob_entropy.py [--repeats 3] [--threads 1]

Last line: `logprob_entropy: peak_mem_ratio=<ours/naive> time_ratio=<ours/naive> peer_time_ratio=<ours/peer>`
(the worse of the two shapes for each ratio).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

SHAPES = [(4096, 1024, 32768), (1024, 1024, 151936)]
VARIANTS = ("naive", "ours", "peer")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")


def _naive(h, w, targets):
    logp_all = (h @ w.T).log_softmax(-1)  # [N, V]
    logp = logp_all.gather(1, targets[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def _ours(h, w, targets):
    from megahybrid.kernels import token_logprob_entropy

    out = token_logprob_entropy(h, w, targets)
    return out.logp, out.entropy


def _peer(h, w, targets):
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(h, w, targets, impl="torch_compile", reduction="none"), None


def child(variant: str, n: int, d: int, v: int, repeats: int) -> dict:
    import torch

    fn = {"naive": _naive, "ours": _ours, "peer": _peer}[variant]
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(n, d, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.05).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    g_logp, g_entropy = torch.randn(n, generator=g), torch.randn(n, generator=g)

    def step():
        h.grad = w.grad = None
        logp, entropy = fn(h, w, targets)
        loss = (logp * g_logp).sum() + (0.0 if entropy is None else (entropy * g_entropy).sum())
        loss.backward()

    if variant == "peer":  # torch.compile: compile once outside the memory and time window
        step()
    h.grad = w.grad = None
    base_kib = _status_kib("VmRSS")
    _reset_peak()
    cpu, wall = [], []
    for _ in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    peak_kib = _status_kib("VmHWM")
    return dict(peak_mb=(peak_kib - base_kib) / 1024, time_s=statistics.median(cpu), wall_s=statistics.median(wall))


def run_variant(variant, shape, repeats, threads) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--child", variant, *map(str, shape), "--repeats", str(repeats)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"  {variant}: failed ({reason[:300]})", flush=True)
        return dict(peak_mb=math.nan, time_s=math.nan, wall_s=math.nan)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per variant (shared 2-core box: 1)")
    ap.add_argument("--child", nargs=4, metavar=("VARIANT", "N", "D", "V"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], *map(int, args.child[1:]), args.repeats)))
        return
    worst = dict(mem=-math.inf, time=-math.inf, peer=-math.inf)
    for shape in SHAPES:
        res = {v: run_variant(v, shape, args.repeats, args.threads) for v in VARIANTS}
        n, d, v = shape
        for name, r in res.items():
            print(f"N={n} D={d} V={v} {name:5s}: peak_mem={r['peak_mb']:8.1f} MB  cpu_time={r['time_s']:7.3f} s  "
                  f"wall={r['wall_s']:7.3f} s", flush=True)
        mem = res["ours"]["peak_mb"] / res["naive"]["peak_mb"]
        tim = res["ours"]["time_s"] / res["naive"]["time_s"]
        peer = res["ours"]["time_s"] / res["peer"]["time_s"]
        print(f"N={n} D={d} V={v} ratios: peak_mem_ratio={mem:.3f} time_ratio={tim:.3f} peer_time_ratio={peer:.3f}"
              f" (peer peak_mem_ratio={res['ours']['peak_mb'] / res['peer']['peak_mb']:.3f})", flush=True)
        worst = dict(mem=max(worst["mem"], mem), time=max(worst["time"], tim), peer=_max_nan(worst["peer"], peer))
    print(f"logprob_entropy: peak_mem_ratio={worst['mem']:.3f} time_ratio={worst['time']:.3f} "
          f"peer_time_ratio={worst['peer']:.3f}")


def _max_nan(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


if __name__ == "__main__":
    main()
