"""Hugging Face `config.json` <-> `ModelConfig` for the Llama and Qwen2/2.5 families."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from megahybrid.config.schema import ModelConfig

_FAMILIES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported (only plain RoPE)")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ValueError(f"{where}: no rope_theta (in rope_parameters or at top level)")
    return float(theta)


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"model.hf_path: {path} does not exist (expected a Hugging Face model folder)")
    with open(path) as f:
        return json.load(f)


def model_config_from_hf(hf_dir: str, base: ModelConfig) -> ModelConfig:
    """`base` with every architecture field taken from `hf_dir/config.json` (the checkpoint decides the shapes;
    training-side fields such as params_dtype and recompute_activations stay as configured)."""
    hf = read_hf_config(hf_dir)
    where = os.path.join(hf_dir, "config.json")
    arch = (hf.get("architectures") or [None])[0]
    if arch not in _FAMILIES:
        raise ValueError(f"{where}: architectures={hf.get('architectures')!r}; supported: {sorted(_FAMILIES)}")
    family = _FAMILIES[arch]
    if family == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ValueError(f"{where}: Llama with attention_bias/mlp_bias (bias on o_proj/MLP) is not supported")
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError(f"{where}: Qwen2 sliding-window attention is not supported")
    heads = hf["num_attention_heads"]
    return dataclasses.replace(
        base, family=family, hf_path=hf_dir, num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, vocab_size=hf["vocab_size"],
        # RoPE theta and context are run choices when the YAML sets them (SRFT raises both for Qwen2.5-Math-7B)
        max_position_embeddings=base.max_position_embeddings,
        rotary_base=_rope_theta(hf, where) if base.rotary_base is None else base.rotary_base,
        norm_epsilon=hf.get("rms_norm_eps", base.norm_epsilon),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), add_qkv_bias=family == "qwen2")


def hf_config_dict(m: ModelConfig) -> dict[str, Any]:
    """A transformers config (as a dict, `config.json` content) for a model built from `m` alone."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                  num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                  num_key_value_heads=m.num_query_groups, max_position_embeddings=m.max_position_embeddings,
                  initializer_range=m.init_method_std, rms_norm_eps=m.norm_epsilon,
                  tie_word_embeddings=m.tie_word_embeddings,
                  rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
                  dtype=m.params_dtype)
    if m.family == "llama":
        if m.qkv_bias:
            raise ValueError("model.add_qkv_bias: HF Llama has no QKV-only bias; use family 'qwen2'")
        cfg = LlamaConfig(**common, head_dim=m.head_dim, attention_bias=False, mlp_bias=False)
    elif m.family == "qwen2":
        if not m.qkv_bias or m.head_dim * m.num_attention_heads != m.hidden_size:
            raise ValueError("model: HF Qwen2 needs a QKV bias and head_dim * num_attention_heads == hidden_size")
        cfg = Qwen2Config(**common, use_sliding_window=False)
    else:
        raise ValueError(f"model.family: expected 'llama' or 'qwen2', got {m.family!r}")
    out = cfg.to_dict()
    out["architectures"] = ["LlamaForCausalLM" if m.family == "llama" else "Qwen2ForCausalLM"]
    return out


# ------------------------------------------------------------------------------------ model by name / checkpoint
BUILTIN_PREFIX = "builtin:"


def _smollm2() -> str:
    from megahybrid.model.smollm2 import smollm2_hf_dir

    return smollm2_hf_dir()


# name -> function returning the HF folder (converted on first use, cached)
BUILTIN_MODELS = {"smollm2-135m-instruct": _smollm2}


def resolve_hf_path(path: str, key: str = "model.hf_path") -> str:
    """`builtin:NAME` -> the folder of a model shipped offline (converted once); any other value unchanged."""
    if not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_MODELS:
        raise ValueError(f"{key}: unknown builtin model {name!r}; available: "
                         f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]()


# ModelConfig field -> the config.json key it is read from (what an error names). rotary_base and
# max_position_embeddings are absent on purpose: a value in the YAML is a deliberate override (SRFT 7B).
CHECKPOINT_FIELDS = {
    "family": "architectures", "num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size", "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads", "head_dim": "head_dim", "vocab_size": "vocab_size",
    "norm_epsilon": "rms_norm_eps", "tie_word_embeddings": "tie_word_embeddings", "add_qkv_bias": "architectures"}


def apply_checkpoint(m: ModelConfig, given: dict[str, Any]) -> tuple[ModelConfig, list[str]]:
    """`m` with `hf_path`/`tokenizer` resolved (`builtin:NAME`) and, when the checkpoint's config.json is on this
    machine, its architecture taken from there (`given` = the YAML's `model:` keys: only those are the config's
    statements). Returns (config, problems); a stated field that disagrees with the checkpoint is a problem naming
    both values, never silently used. A checkpoint not present here (a cluster path) leaves `m` as configured."""
    problems: list[str] = []
    try:
        if m.tokenizer:
            m = dataclasses.replace(m, tokenizer=resolve_hf_path(m.tokenizer, "model.tokenizer"))
        if not m.hf_path:
            return m, problems
        m = dataclasses.replace(m, hf_path=resolve_hf_path(m.hf_path))
    except (ValueError, OSError, ImportError) as exc:
        return m, [str(exc)]
    where = os.path.join(m.hf_path, "config.json")
    if not os.path.isfile(where):
        return m, problems
    try:
        hf = read_hf_config(m.hf_path)
        if "max_position_embeddings" not in given:  # a config states only what it changes
            m = dataclasses.replace(m, max_position_embeddings=int(hf.get("max_position_embeddings",
                                                                          m.max_position_embeddings)))
        effective = model_config_from_hf(m.hf_path, m)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        return m, [f"model.hf_path: {where}: cannot read the model config ({type(exc).__name__}: {exc})"]
    for field, hf_key in CHECKPOINT_FIELDS.items():
        if field not in given or given[field] is None:
            continue
        stated = getattr(m, field) if field != "add_qkv_bias" else m.qkv_bias
        actual = getattr(effective, field) if field != "add_qkv_bias" else effective.qkv_bias
        if stated != actual:
            problems.append(f"model.{field}: the config says {stated!r} but the checkpoint {where} has "
                            f"{hf_key}={hf.get(hf_key)!r} (= model.{field} {actual!r}); drop the key (the checkpoint "
                            f"decides the architecture) or point model.hf_path at another checkpoint")
    return effective, problems
