"""Tiny random-init Hugging Face models and a character-level tokenizer, saved as folders that both
transformers (`AutoTokenizer`, `AutoModelForCausalLM`) and vLLM load offline.

Used by tiny CPU runs and tests: no hub access exists here, so every model is built from a `ModelConfig`.
"""
from __future__ import annotations

import os
import shutil
import string
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from megahybrid.config.schema import ModelConfig

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
"""Special tokens, ids 0..3 in this order."""
MARKUP_TOKENS = ("<think>", "</think>", "\\boxed{")
"""Markup the templates use, kept as single tokens so tiny models see short sequences (ids 4..6)."""
DEFAULT_ALPHABET = (
    string.digits + "+-*/=() \n" + string.ascii_letters + ".,:;?!'\"_^{}[]<>\\|%$&#~@`"
)
"""Digits, arithmetic, whitespace, letters, and the punctuation/markup characters of the templates."""
ARITH_ALPHABET = string.digits + "+-*/=() \n<>/\\{}"
"""Smallest alphabet for the bundled arithmetic task (plain template)."""

_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
    "{% else %}{{ m['content'] + '\n' }}{% endif %}{% endfor %}"
)


def char_vocab(alphabet: str | None = None) -> list[str]:
    """Token strings by id: specials, markup tokens, then each distinct character of `alphabet` once."""
    chars = dict.fromkeys(DEFAULT_ALPHABET if alphabet is None else alphabet)
    return list(SPECIAL_TOKENS) + list(MARKUP_TOKENS) + list(chars)


def build_char_tokenizer(out_dir: str | os.PathLike, alphabet: str | None = None) -> PreTrainedTokenizerFast:
    """Build a character-level tokenizer, save it as a Hugging Face folder at `out_dir`, and return it.

    Every character of `alphabet` (default `DEFAULT_ALPHABET`) is one token; `<think>`, `</think>` and
    `\\boxed{` are single tokens; unknown characters map to `<unk>`. Like a Llama tokenizer, `tokenizer(text)`
    prefixes BOS (the prompt encoder follows the tokenizer's own convention); `add_special_tokens=False`, which
    responses use, adds nothing, so prompt/response masks line up.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = char_vocab(alphabet)
    if any(len(c) != 1 for c in vocab[len(SPECIAL_TOKENS) + len(MARKUP_TOKENS):]):
        raise ValueError("alphabet must be a string of single characters")
    # BPE with no merges = one token per character; Split("") isolates every character before the model.
    model = models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=[], unk_token=UNK)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate characters back without separators
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.add_tokens(list(MARKUP_TOKENS))
    bos_id = SPECIAL_TOKENS.index(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False, model_max_length=1 << 20,
    )
    fast.chat_template = _CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def _hf_config(cfg: ModelConfig, vocab_size: int, tok: PreTrainedTokenizerFast):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.init_method_std, rms_norm_eps=cfg.norm_epsilon,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        dtype=cfg.params_dtype,
    )
    if cfg.family == "llama":
        # HF Llama's attention_bias also puts a bias on o_proj, which Megatron's add_qkv_bias does not.
        if cfg.qkv_bias:
            raise ValueError("model.add_qkv_bias: family 'llama' has no QKV-only bias; use family 'qwen2'")
        return LlamaConfig(**common, head_dim=cfg.head_dim, attention_bias=False, mlp_bias=False)
    if cfg.family == "qwen2":
        if not cfg.qkv_bias:
            raise ValueError("model.add_qkv_bias: family 'qwen2' always has a QKV bias; use family 'llama'")
        if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
            raise ValueError(
                f"model.head_dim: qwen2 needs head_dim * num_attention_heads == hidden_size "
                f"({cfg.head_dim} * {cfg.num_attention_heads} != {cfg.hidden_size})"
            )
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(f"model.family: expected 'llama' or 'qwen2', got {cfg.family!r}")


def build_tiny_hf_model(
    cfg: ModelConfig, out_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None, seed: int = 0
) -> str:
    """Random-init a LlamaForCausalLM / Qwen2ForCausalLM from `cfg`, save it to `out_dir` and return the path.

    Weights are saved as safetensors in `cfg.params_dtype`; the tokenizer files of `tokenizer_dir` are copied
    in (default: a fresh `build_char_tokenizer`). The caller's global torch RNG state is left untouched.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tok = build_char_tokenizer(out)
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        for name in os.listdir(tokenizer_dir):
            if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template", "added_tokens")):
                if Path(tokenizer_dir).resolve() != out.resolve():
                    shutil.copy2(Path(tokenizer_dir) / name, out / name)
    if len(tok) > cfg.vocab_size:
        raise ValueError(f"model.vocab_size: {cfg.vocab_size} is smaller than the tokenizer's {len(tok)} tokens")
    hf_cfg = _hf_config(cfg, cfg.vocab_size, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=getattr(torch, cfg.params_dtype))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    return str(out)
