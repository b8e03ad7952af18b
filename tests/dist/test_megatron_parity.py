"""Megatron GPTModel built by the converter == the transformers model, at TP1, TP2, PP2, TP2xPP2 and PP2 with
virtual pipeline stages, for a tiny Llama (tied embeddings) and a tiny Qwen2 (QKV bias, untied head): logits
(max abs diff <= 1e-4 in fp32), aligned log-probs and entropies vs a float64 log-softmax of the HF logits, the
same answer on every rank, and HF -> Megatron (TP2xPP2) -> HF export bit-exact. A random init from the config
alone is the same model at TP1 and TP2xPP2 and exports to a loadable HF folder. One 4-rank torchrun launch."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # helpers, also under --import-mode=importlib
from megatron_cases import eval_tokens, hf_logp_entropy, launch, tiny_hf_model  # noqa: E402

LAYOUTS = ["1,1", "2,1", "1,2", "2,2", "1,2,2"]
FAMILIES = {"llama": True, "qwen2": False}  # family -> tied embeddings


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_parity")
    dirs = {fam: tiny_hf_model(root / fam, fam, tie) for fam, tie in FAMILIES.items()}
    results = launch("parity", 4, root / "out.pt", dirs["llama"], dirs["qwen2"], str(root / "export"), timeout=540)
    return results, dirs, root / "export"


def _hf(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.mark.dist
@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_logp_entropy_match_transformers(parity, family):
    results, dirs, _ = parity
    tokens = eval_tokens()
    model = _hf(dirs[family])
    with torch.no_grad():
        hf_logits = model(tokens).logits
        ref_logp, ref_entropy = hf_logp_entropy(model, tokens)
    for layout in LAYOUTS:
        per_rank = results[(family, layout)]
        assert len(per_rank) == 4
        for rank, (logits, logp, entropy) in enumerate(per_rank):
            where = f"{family} layout(tp,pp[,vpp])={layout} rank {rank}"
            assert logits.shape == hf_logits.shape, where
            assert (logits - hf_logits).abs().max() <= 1e-4, where
            assert (logp.double() - ref_logp).abs().max() <= 1e-4, where
            assert (entropy.double() - ref_entropy).abs().max() <= 1e-4, where
            assert torch.all(logp[:, 0] == 0) and torch.all(entropy[:, 0] == 0), where


@pytest.mark.dist
@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_round_trip_is_bit_exact(parity, family):
    from safetensors.torch import load_file

    _, dirs, export = parity
    original = load_file(str(Path(dirs[family]) / "model.safetensors"))
    exported = load_file(str(export / family / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    # and the exported folder is a loadable HF model
    tokens = eval_tokens()
    with torch.no_grad():
        assert torch.equal(_hf(export / family)(tokens).logits, _hf(dirs[family])(tokens).logits)


@pytest.mark.dist
@pytest.mark.timeout(600)
def test_random_init_is_layout_independent_and_exports(parity):
    results, _, export = parity
    tp1 = results[("random", "1,1")][0][0]
    for (logits,) in results[("random", "2,2")]:
        assert (logits - tp1).abs().max() <= 1e-5
    with torch.no_grad():
        hf_logits = _hf(export / "random")(eval_tokens()).logits
    assert (hf_logits - tp1).abs().max() <= 1e-4
    assert tp1.std() > 0
