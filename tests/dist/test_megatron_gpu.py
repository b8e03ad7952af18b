"""GPU path (runs where CUDA exists): NCCL backend, Transformer Engine layer spec (fused layernorm-linear names
mapped by the converter), logits vs transformers, one train step vs the float64 reference, and a dist checkpoint
round trip (the step after loading repeats the step after saving)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # helpers, also under --import-mode=importlib
from megatron_cases import eval_tokens, hf_reference_step, launch, micro_batches, tiny_hf_model  # noqa: E402


@pytest.mark.gpu
@pytest.mark.dist
@pytest.mark.timeout(900)
@pytest.mark.parametrize("family,tie", [("llama", True), ("qwen2", False)])
def test_nccl_te_policy_matches_transformers(tmp_path, family, tie):
    pytest.importorskip("transformer_engine", reason="the GPU layer spec needs transformer-engine (gpu extra)")
    from transformers import AutoModelForCausalLM

    hf_dir = tiny_hf_model(tmp_path / family, family, tie)
    res = launch("gpu", 1, tmp_path / "out.pt", hf_dir, str(tmp_path / "ckpt"), timeout=600)
    with torch.no_grad():
        ref_logits = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(eval_tokens()).logits
    assert (res["logits"] - ref_logits).abs().max() <= 2e-3  # TE kernels may use TF32
    ref = hf_reference_step(hf_dir, micro_batches())
    assert res["first"].loss == pytest.approx(ref["loss"], rel=1e-3)
    assert res["first"].grad_norm == pytest.approx(ref["grad_norm"], rel=1e-2)
    assert res["extra"] == {"step": 1}
    assert res["again"].loss == pytest.approx(res["second"].loss, rel=1e-5)
