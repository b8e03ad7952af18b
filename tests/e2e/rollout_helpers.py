"""Shared helpers of the rollout e2e tests: a tiny random Llama folder and a Hugging Face log-prob reference."""
from __future__ import annotations

import torch

from megahybrid.config.schema import ModelConfig
from megahybrid.model.tiny import build_char_tokenizer, build_tiny_hf_model, char_vocab

TINY = ModelConfig(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=2,
                   num_query_groups=1, head_dim=32, vocab_size=len(char_vocab()), max_position_embeddings=256)


def build_tiny(tmp_dir, seed: int = 0) -> str:
    tok_dir = tmp_dir / "tok"
    build_char_tokenizer(tok_dir)
    return build_tiny_hf_model(TINY, tmp_dir / "model", tokenizer_dir=tok_dir, seed=seed)


def hf_logprobs(model, prompt: list[int], response: list[int]) -> list[float]:
    """Log-prob of each response token under `model` (float64 log-softmax of its float32 logits)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(response)]


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()}
