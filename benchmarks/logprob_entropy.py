"""Benchmark: per-token log-prob + entropy of an LM head, forward + backward, on this CPU (float32).

Variants (each in a FRESH subprocess, so its peak memory is its own):
  naive  materialised logits [N, V] + log_softmax + entropy, plain autograd
  ours   megahybrid.kernels.token_logprob_entropy (impl="chunked", the CPU default)
  peer   cut-cross-entropy's torch.compile implementation (`linear_cross_entropy(..., impl="torch_compile")`);
         it returns the cross-entropy only (no entropy), so it does strictly less work than naive / ours.

Two setups of the LM-head weight's gradient:
  main_grad  as in Megatron training: the weight carries a preallocated fp32 `main_grad` buffer (Megatron DDP's
             gradient buffer), allocated before the baseline memory is taken. naive and peer return an
             ordinary autograd weight gradient, which is then added into main_grad and dropped
             (`main_grad.add_(w.grad); w.grad = None`: what Megatron DDP's backward hook does for such layers);
             ours accumulates into main_grad directly (accumulate_into_main_grad, auto-detected).
  plain      no main_grad: every variant returns `w.grad` (informational).

Peak memory = the process's RSS high-water mark (VmHWM, reset after the inputs exist) minus its RSS then, i.e.
what the op itself adds on top of its inputs (gradients included). Time = median CPU time (time.process_time) of
fwd+bwd with one torch thread: on a shared machine CPU time is what the code costs, while wall time mostly
measures the neighbours (both are printed; ratios use CPU time). Variants run in turn, `--rounds` times, so slow
phases of the machine hit all of them alike; the median is over every step of every round, the peak the largest.
Shapes: N=4096, D=1024, V=32768 and N=1024, D=1024, V=151936 (Qwen2.5 vocabulary).

GEMM floor: a recompute-based head (ours) cannot beat 4 GEMMs of N x D x V (forward logits; backward: recomputed
logits, grad_hidden, grad_weight). A fourth child process, interleaved with the variants, times one
[N, D] x [D, V] float32 GEMM on one thread in every way this box offers and keeps the fastest (median over
steps): torch.mm into a preallocated output (MKL) and oneDNN (torch.ops.mkldnn._linear_pointwise, the backend our
kernel uses on x86) over vocabulary slabs of several widths (fresh outputs of at most a few MB: one [N, V] output
would add page faults, not GEMM work). gemm_floor_ratio = ours / (4 x that GEMM).

    .venv/bin/python benchmarks/logprob_entropy.py [--rounds 2] [--repeats 2] [--threads 1]

The line before the last gives the plain setup's ratios. Last line (main_grad setup):
`logprob_entropy: peak_mem_ratio=<ours/naive> time_ratio=<ours/naive> peer_time_ratio=<ours/peer>
gemm_floor_ratio=<ours/(4 GEMMs)>` (the worse of the two shapes for each ratio).
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
SETUPS = ("plain", "main_grad")


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

    out = token_logprob_entropy(h, w, targets)  # accumulate_into_main_grad: auto (w has main_grad or not)
    return out.logp, out.entropy


def _peer(h, w, targets):
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(h, w, targets, impl="torch_compile", reduction="none"), None


def child(variant: str, setup: str, n: int, d: int, v: int, repeats: int) -> dict:
    import torch

    fn = {"naive": _naive, "ours": _ours, "peer": _peer}[variant]
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(n, d, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.05).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    g_logp, g_entropy = torch.randn(n, generator=g), torch.randn(n, generator=g)
    if setup == "main_grad":
        w.main_grad = torch.zeros_like(w)  # Megatron DDP's preallocated fp32 gradient buffer

    def step():
        h.grad = w.grad = None
        logp, entropy = fn(h, w, targets)
        loss = (logp * g_logp).sum() + (0.0 if entropy is None else (entropy * g_entropy).sum())
        loss.backward()
        if setup == "main_grad" and w.grad is not None:  # Megatron DDP's hook for a non-fused layer
            w.main_grad.add_(w.grad)
            w.grad = None

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
    return dict(peak_mb=(peak_kib - base_kib) / 1024, cpu_s=cpu, wall_s=wall)


GEMM_SLABS = (256, 1024, 4096)  # oneDNN vocabulary slab widths tried for the floor GEMM


def gemm_child(n: int, d: int, v: int, repeats: int) -> dict:
    """CPU time of one [n, d] x [d, v] float32 GEMM per way of running it: {way: [seconds per repeat]}."""
    import torch

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.05
    out = torch.empty(n, v)
    ways = {"torch.mm (MKL)": lambda: torch.mm(h, w.T, out=out)}
    if torch.backends.mkldnn.is_available():
        lin = torch.ops.mkldnn._linear_pointwise
        for slab in GEMM_SLABS:
            ways[f"oneDNN slabs of {slab}"] = lambda slab=slab: [lin(h, w[v0:v0 + slab], None, "none", [], "")
                                                                 for v0 in range(0, v, slab)]
    times = {}
    for name, fn in ways.items():
        fn()  # warm-up: first-touch page faults, oneDNN kernel generation
        times[name] = []
        for _ in range(repeats):
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return dict(ways=times)


def run_variant(variant, setup, shape, repeats, threads) -> dict | None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--child", variant, setup, *map(str, shape), "--repeats", str(repeats)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"  {variant} ({setup}): failed ({reason[:300]})", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(setup, shape, args) -> dict:
    """{variant: {peak_mb, time_s, wall_s}} over `rounds` interleaved rounds; "gemm": {time_s, way} of the
    fastest single GEMM (median over all its steps)."""
    runs = {v: [] for v in VARIANTS}
    gemm = {}
    for _ in range(args.rounds):
        for variant in VARIANTS + ("gemm",):
            res = run_variant(variant, setup, shape, args.repeats, args.threads)
            if res is None:
                continue
            if variant == "gemm":
                for way, ts in res["ways"].items():
                    gemm.setdefault(way, []).extend(ts)
            else:
                runs[variant].append(res)
    out = {"gemm": dict(time_s=math.nan, way="none")}
    if gemm:
        way = min(gemm, key=lambda k: statistics.median(gemm[k]))
        out["gemm"] = dict(time_s=statistics.median(gemm[way]), way=way,
                           all={k: statistics.median(ts) for k, ts in gemm.items()})
    for variant, rs in runs.items():
        if not rs:
            out[variant] = dict(peak_mb=math.nan, time_s=math.nan, wall_s=math.nan)
            continue
        out[variant] = dict(peak_mb=max(r["peak_mb"] for r in rs),
                            time_s=statistics.median(t for r in rs for t in r["cpu_s"]),
                            wall_s=statistics.median(t for r in rs for t in r["wall_s"]))
    return out


def report(setup, args) -> dict:
    worst = dict(mem=-math.inf, time=-math.inf, peer=-math.inf, floor=-math.inf)
    for shape in args.shapes:
        res = measure(setup, shape, args)
        gemm = res.pop("gemm")
        n, d, v = shape
        for name, r in res.items():
            print(f"[{setup}] N={n} D={d} V={v} {name:5s}: peak_mem={r['peak_mb']:8.1f} MB  "
                  f"cpu_time={r['time_s']:7.3f} s  wall={r['wall_s']:7.3f} s", flush=True)
        mem = res["ours"]["peak_mb"] / res["naive"]["peak_mb"]
        tim = res["ours"]["time_s"] / res["naive"]["time_s"]
        peer = res["ours"]["time_s"] / res["peer"]["time_s"]
        floor = res["ours"]["time_s"] / (4 * gemm["time_s"])
        ways = ", ".join(f"{k} {t:.3f} s" for k, t in gemm.get("all", {}).items())
        print(f"[{setup}] N={n} D={d} V={v} one GEMM: cpu_time={gemm['time_s']:7.3f} s "
              f"({2 * n * d * v / gemm['time_s'] / 1e9:.0f} GFLOP/s, {gemm['way']}; all: {ways})", flush=True)
        print(f"[{setup}] N={n} D={d} V={v} ratios: peak_mem_ratio={mem:.3f} time_ratio={tim:.3f} "
              f"peer_time_ratio={peer:.3f} gemm_floor_ratio={floor:.3f} "
              f"(peer peak_mem_ratio={res['ours']['peak_mb'] / res['peer']['peak_mb']:.3f})", flush=True)
        worst = dict(mem=_max_nan(worst["mem"], mem), time=_max_nan(worst["time"], tim),
                     peer=_max_nan(worst["peer"], peer), floor=_max_nan(worst["floor"], floor))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every variant")
    ap.add_argument("--repeats", type=int, default=2, help="timed fwd+bwd steps per variant process")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per variant (shared 2-core box: 1)")
    ap.add_argument("--shapes", type=_shapes, default=SHAPES, help="N,D,V[;N,D,V] (default: the two above)")
    ap.add_argument("--child", nargs=5, metavar=("VARIANT", "SETUP", "N", "D", "V"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        shape = tuple(map(int, args.child[2:]))
        res = gemm_child(*shape, args.repeats) if args.child[0] == "gemm" else \
            child(args.child[0], args.child[1], *shape, args.repeats)
        print(json.dumps(res))
        return
    print("setup plain: w.grad returned by every variant. setup main_grad: w.main_grad (fp32) preallocated "
          "before the baseline; naive/peer add w.grad into it and drop it (Megatron DDP's hook); ours "
          "accumulates into it (accumulate_into_main_grad)", flush=True)
    worst = {setup: report(setup, args) for setup in SETUPS}
    plain, fused = worst["plain"], worst["main_grad"]
    print(f"logprob_entropy (plain, no main_grad; informational): peak_mem_ratio={plain['mem']:.3f} "
          f"time_ratio={plain['time']:.3f} peer_time_ratio={plain['peer']:.3f} "
          f"gemm_floor_ratio={plain['floor']:.3f}")
    print(f"logprob_entropy: peak_mem_ratio={fused['mem']:.3f} time_ratio={fused['time']:.3f} "
          f"peer_time_ratio={fused['peer']:.3f} gemm_floor_ratio={fused['floor']:.3f}")


def _shapes(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in part.split(",")) for part in text.split(";")]


def _max_nan(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


if __name__ == "__main__":
    main()
