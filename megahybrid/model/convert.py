"""Hugging Face (Llama, Qwen2/2.5) <-> Megatron-Core GPTModel weights, with TP/PP resharding.

Megatron layouts (per layer; `r = num_heads / num_query_groups`, `d = head_dim`):
- `linear_qkv.weight` `[G * (r + 2) * d, H]`, grouped: for each KV group g, its r query heads, then k_g, then v_g.
  Tensor parallelism splits whole groups, so rank t holds groups `[t*G/T, (t+1)*G/T)` (same for the QKV bias).
- `linear_fc1.weight` `[2F/T, H]` on rank t: `cat(gate_proj[t-th F/T rows], up_proj[t-th F/T rows])`.
- `linear_proj` (o_proj) and `linear_fc2` (down_proj) split input columns; norms are replicated.
- embedding / output layer `[V_pad/T, H]`: vocabulary rows, padded with zero rows past the true vocabulary.
Pipeline stages hold whole layers; a layer's global index is `layer.layer_number - 1`.

Loading reads each rank's slice straight from the safetensors files (`HFCheckpointReader.read(rows=, cols=)`);
export gathers one parameter at a time over the TP group and streams it to the writer rank over the PP group.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
import torch.distributed as dist

from megahybrid.config.schema import ModelConfig


class WeightSource(Protocol):
    """Anything that reads HF-named tensors (or row/column slices of them)."""

    def has(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class TPInfo:
    rank: int
    size: int
    group: dist.ProcessGroup | None = None

    def part(self, n: int) -> slice:
        """This rank's contiguous 1/T part of a dimension of size n."""
        step = n // self.size
        return slice(self.rank * step, (self.rank + 1) * step)


def _gather(local: torch.Tensor, tp: TPInfo, dim: int) -> torch.Tensor:
    """Concatenate the TP ranks' pieces along `dim` (identity at T=1)."""
    if tp.size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(tp.size)]
    dist.all_gather(parts, local.contiguous(), group=tp.group)
    return torch.cat(parts, dim=dim)


# ----------------------------------------------------------------------------------------------- per-param maps
class _Map:
    """One Megatron parameter <-> the HF tensor(s) it is made of."""

    def to_local(self, src: WeightSource, m: ModelConfig, tp: TPInfo) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, local: torch.Tensor, m: ModelConfig, tp: TPInfo) -> list[tuple[str, torch.Tensor]]:
        raise NotImplementedError


@dataclass
class _Replicated(_Map):
    name: str

    def to_local(self, src, m, tp):
        return src.read(self.name)

    def to_hf(self, local, m, tp):
        return [(self.name, local)]


@dataclass
class _SplitCols(_Map):
    """Row-parallel linear: the input (column) dimension is split."""

    name: str

    def to_local(self, src, m, tp):
        return src.read(self.name, cols=tp.part(src.shape(self.name)[1]))

    def to_hf(self, local, m, tp):
        return [(self.name, _gather(local, tp, dim=1))]


@dataclass
class _GateUp(_Map):
    gate: str
    up: str

    def to_local(self, src, m, tp):
        rows = tp.part(m.ffn_hidden_size)
        return torch.cat([src.read(self.gate, rows=rows), src.read(self.up, rows=rows)], dim=0)

    def to_hf(self, local, m, tp):
        gate, up = local.chunk(2, dim=0)
        return [(self.gate, _gather(gate, tp, 0)), (self.up, _gather(up, tp, 0))]


@dataclass
class _QKV(_Map):
    """Fused grouped QKV weight (`[rows, H]`) or bias (`[rows]`)."""

    q: str
    k: str
    v: str

    def to_local(self, src, m, tp):
        d, groups = m.head_dim, m.num_query_groups
        r = m.num_attention_heads // groups
        g = tp.part(groups)
        q = src.read(self.q, rows=slice(g.start * r * d, g.stop * r * d))
        k = src.read(self.k, rows=slice(g.start * d, g.stop * d))
        v = src.read(self.v, rows=slice(g.start * d, g.stop * d))
        n_local, rest = g.stop - g.start, q.shape[1:]
        fused = torch.cat([q.reshape(n_local, r * d, *rest), k.reshape(n_local, d, *rest),
                           v.reshape(n_local, d, *rest)], dim=1)
        return fused.reshape(n_local * (r + 2) * d, *rest)

    def to_hf(self, local, m, tp):
        d = m.head_dim
        r = m.num_attention_heads // m.num_query_groups
        n_local, rest = local.shape[0] // ((r + 2) * d), local.shape[1:]
        q, k, v = local.reshape(n_local, (r + 2) * d, *rest).split([r * d, d, d], dim=1)
        return [(self.q, _gather(q.reshape(-1, *rest), tp, 0)), (self.k, _gather(k.reshape(-1, *rest), tp, 0)),
                (self.v, _gather(v.reshape(-1, *rest), tp, 0))]


@dataclass
class _Vocab(_Map):
    """Embedding / LM head rows: this rank's part of the padded vocabulary, zero past the true vocabulary."""

    name: str
    padded: int

    def to_local(self, src, m, tp):
        rows = tp.part(self.padded)
        true_rows = slice(min(rows.start, m.vocab_size), min(rows.stop, m.vocab_size))
        out = torch.zeros(rows.stop - rows.start, m.hidden_size, dtype=torch.float32)
        if true_rows.stop > true_rows.start:
            part = src.read(self.name, rows=true_rows)
            out = out.to(part.dtype)
            out[: true_rows.stop - true_rows.start] = part
        return out

    def to_hf(self, local, m, tp):
        return [(self.name, _gather(local, tp, 0)[: m.vocab_size])]


def _layer_map(suffix: str, layer: int) -> _Map:
    p = f"model.layers.{layer}."
    a, mlp = p + "self_attn.", p + "mlp."
    maps: dict[str, Callable[[], _Map]] = {
        "input_layernorm.weight": lambda: _Replicated(p + "input_layernorm.weight"),
        "self_attention.linear_qkv.layer_norm_weight": lambda: _Replicated(p + "input_layernorm.weight"),
        "self_attention.linear_qkv.weight": lambda: _QKV(a + "q_proj.weight", a + "k_proj.weight",
                                                         a + "v_proj.weight"),
        "self_attention.linear_qkv.bias": lambda: _QKV(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
        "self_attention.linear_proj.weight": lambda: _SplitCols(a + "o_proj.weight"),
        "pre_mlp_layernorm.weight": lambda: _Replicated(p + "post_attention_layernorm.weight"),
        "mlp.linear_fc1.layer_norm_weight": lambda: _Replicated(p + "post_attention_layernorm.weight"),
        "mlp.linear_fc1.weight": lambda: _GateUp(mlp + "gate_proj.weight", mlp + "up_proj.weight"),
        "mlp.linear_fc2.weight": lambda: _SplitCols(mlp + "down_proj.weight"),
    }
    if suffix not in maps:
        raise KeyError(f"no HF mapping for Megatron layer parameter {suffix!r} (layer {layer})")
    return maps[suffix]()


EXTRA_PREFIX = "megahybrid_extra"
"""Attribute name under which non-HF parameters (learnable loss scalars) hang on a model chunk."""


def iter_param_maps(chunk: torch.nn.Module, m: ModelConfig, padded_vocab: int
                    ) -> Iterator[tuple[str, torch.nn.Parameter, _Map]]:
    """(Megatron name, parameter, its HF map) for every weight of an unwrapped GPTModel chunk, in module order."""
    for name, param in chunk.named_parameters():
        if name == "embedding.word_embeddings.weight":
            yield name, param, _Vocab("model.embed_tokens.weight", padded_vocab)
        elif name == "output_layer.weight":
            yield name, param, _Vocab("model.embed_tokens.weight" if m.tie_word_embeddings else "lm_head.weight",
                                      padded_vocab)
        elif name == "decoder.final_layernorm.weight":
            yield name, param, _Replicated("model.norm.weight")
        elif name.startswith("decoder.layers."):
            idx, suffix = name[len("decoder.layers."):].split(".", 1)
            layer = chunk.decoder.layers[int(idx)].layer_number - 1
            yield name, param, _layer_map(suffix, layer)
        elif not name.startswith(EXTRA_PREFIX):
            raise KeyError(f"no HF mapping for Megatron parameter {name!r}")


def hf_tensor_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint of `m` and its shape."""
    h, d, f = m.hidden_size, m.head_dim, m.ffn_hidden_size
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (m.vocab_size, h)}
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (q, h),
                       p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                       p + "self_attn.o_proj.weight": (h, q), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
        if m.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    shapes["model.norm.weight"] = (h,)
    if not m.tie_word_embeddings:
        shapes["lm_head.weight"] = (m.vocab_size, h)
    return shapes


class RandomSource:
    """Seeded random HF weights generated per tensor name, so a random init is identical at every TP/PP layout.

    Normal(0, init_method_std) for weights, Megatron's scaled std / sqrt(2 L) for the output projections
    (o_proj, down_proj), ones for norms, zeros for biases."""

    def __init__(self, m: ModelConfig, seed: int):
        self.m, self.seed, self._shapes = m, seed, hf_tensor_shapes(m)

    def has(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        shape = self._shapes[name]
        if name.endswith("norm.weight"):
            full = torch.ones(shape)
        elif name.endswith(".bias"):
            full = torch.zeros(shape)
        else:
            std = self.m.init_method_std
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                std /= (2.0 * self.m.num_layers) ** 0.5
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
            full = torch.randn(shape, generator=gen) * std
        full = full if rows is None else full[rows]
        return full if cols is None else full[:, cols]


def check_source(src: WeightSource, m: ModelConfig, where: str) -> None:
    """Every expected HF tensor exists with the shape the model config implies."""
    for name, shape in hf_tensor_shapes(m).items():
        if not src.has(name):
            raise KeyError(f"{where}: missing tensor {name!r} (model config: {m.family}, "
                           f"tie_word_embeddings={m.tie_word_embeddings}, qkv_bias={m.qkv_bias})")
        if tuple(src.shape(name)) != shape:
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(src.shape(name))}, the model config "
                             f"implies {shape}")


@torch.no_grad()
def load_into_megatron(chunks: list[torch.nn.Module], src: WeightSource, m: ModelConfig, tp: TPInfo,
                       padded_vocab: int) -> None:
    """Copy this rank's shard of every parameter from `src` (HF names) into the unwrapped model chunks."""
    for chunk in chunks:
        for name, param, mapping in iter_param_maps(chunk, m, padded_vocab):
            local = mapping.to_local(src, m, tp)
            if tuple(local.shape) != tuple(param.shape):
                raise ValueError(f"{name}: HF slice has shape {tuple(local.shape)}, the Megatron parameter "
                                 f"{tuple(param.shape)} (TP rank {tp.rank}/{tp.size})")
            param.data.copy_(local)


@torch.no_grad()
def iter_stage_hf_tensors(chunks: list[torch.nn.Module], m: ModelConfig, tp: TPInfo, padded_vocab: int
                          ) -> Iterator[tuple[str, torch.Tensor]]:
    """Full (TP-gathered) HF tensors of this pipeline stage, one parameter at a time. Collective over TP."""
    for chunk in chunks:
        for name, param, mapping in iter_param_maps(chunk, m, padded_vocab):
            if name == "output_layer.weight" and m.tie_word_embeddings:
                continue  # the tied head is a copy of the embedding (exported from the first stage)
            yield from mapping.to_hf(param.detach(), m, tp)
