"""GPU rollout path: CUDA vLLM engine, NCCL broadcast weight sync (trainer side on GPU 0, engine on GPU 1).
Runs only where CUDA exists (tests/conftest.py skips `gpu` tests otherwise); NCCL cannot put two ranks on one
GPU, so it needs two devices."""
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from megahybrid.config.schema import RolloutConfig
from megahybrid.rollout import RolloutPool, SamplingOptions

sys.path.insert(0, str(Path(__file__).parent))
from rollout_helpers import build_tiny, hf_logprobs, perturbed  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL broadcast needs 2 GPUs (one per rank)")
def test_cuda_engine_and_nccl_broadcast(tmp_path):
    model_dir = build_tiny(tmp_path)
    torch.cuda.set_device(0)
    cfg = RolloutConfig(num_workers=1, gpus_per_worker=1, gpu_memory_utilization=0.3, weight_sync="broadcast")
    prompts = [[10, 17, 11, 21], [11, 12, 13]]
    with RolloutPool(cfg, model_dir, seed=0, max_model_len=128, gpu_ids=[1], dtype="float32") as pool:
        new = perturbed(load_file(os.path.join(model_dir, "model.safetensors")), seed=3)
        pool.broadcast_weights({k: v.cuda() for k, v in new.items()})
        res = pool.generate(prompts, 2, SamplingOptions(max_new_tokens=8, seed=1))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.load_state_dict(new, strict=False)
    for p, samples in zip(prompts, res):
        for s in samples:
            ref = hf_logprobs(model, p, s.token_ids)
            assert max(abs(a - b) for a, b in zip(s.logprobs, ref)) <= 1e-3  # GPU kernels: looser than CPU
