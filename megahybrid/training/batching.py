"""From generated groups to the per-rank `Batch` tensors, and from a `Batch` to equal-shape micro-batches.

A *group* is one prompt with its rollouts and (when the step uses them) its demonstrations. Whole groups go to
one data-parallel rank, so every group statistic of `Algorithm.prepare` is local.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megahybrid.algorithms.base import Batch


@dataclass
class Sequence:
    """One row of a batch: prompt ids + response ids (rollout tokens or an encoded demo)."""

    prompt_ids: list[int]
    response_ids: list[int]
    is_demo: bool
    reward: float
    engine_logp: list[float] | None = None
    """Engine log-prob of each response token (rollouts); None for demos."""
    finish_reason: str = ""


@dataclass
class Group:
    """One prompt of the step and everything generated or loaded for it."""

    example_index: int
    """Index of the example in the training set (for logs and reproducibility)."""
    prompt_text: str
    prompt_ids: list[int]
    answer: str
    sequences: list[Sequence] = field(default_factory=list)

    @property
    def rollouts(self) -> list[Sequence]:
        return [s for s in self.sequences if not s.is_demo]


def length_multiple(*, tensor_model_parallel_size: int, sequence_parallel: bool, fp8: bool) -> int:
    """What every padded sequence length must be a multiple of. Sequence parallel splits the sequence dimension
    over the TP ranks (megatron.core tensor_parallel/mappings.py asserts it divides); Transformer Engine's FP8
    GEMMs in the layers need token counts divisible by 16 (the FP8 LM head pads its own rows)."""
    multiple = tensor_model_parallel_size if sequence_parallel else 1
    return math.lcm(multiple, 16) if fp8 else multiple


def collate(groups: list[Group], *, prompt_offset: int, pad_id: int, length_multiple: int = 1) -> Batch:
    """Right-padded `Batch` of all sequences of `groups`; prompt_index = prompt_offset + position in `groups`.
    The length is the longest sequence rounded up to `length_multiple` (padding sits after every real token:
    causal attention, so it changes nothing before it)."""
    rows = [(prompt_offset + g, s) for g, group in enumerate(groups) for s in group.sequences]
    S = len(rows)
    T = max((len(s.prompt_ids) + len(s.response_ids) for _, s in rows), default=1)
    T = -(-T // length_multiple) * length_multiple
    tokens = torch.full((S, T), pad_id, dtype=torch.long)
    response_mask = torch.zeros((S, T), dtype=torch.bool)
    engine_logp = torch.zeros((S, T), dtype=torch.float32)
    for i, (_, s) in enumerate(rows):
        p, r = len(s.prompt_ids), len(s.response_ids)
        tokens[i, :p + r] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        response_mask[i, p:p + r] = True
        if s.engine_logp is not None:
            engine_logp[i, p:p + r] = torch.tensor(s.engine_logp, dtype=torch.float32)
    return Batch(
        tokens=tokens, response_mask=response_mask,
        prompt_index=torch.tensor([g for g, _ in rows], dtype=torch.long),
        is_demo=torch.tensor([s.is_demo for _, s in rows], dtype=torch.bool),
        rewards=torch.tensor([s.reward for _, s in rows], dtype=torch.float32),
        engine_logp=engine_logp)


def padding_rows(like: Batch, num: int, pad_id: int) -> Batch:
    """`num` rows that contribute nothing: no response tokens, prompt_index -1, zero rewards and fields."""
    T = like.tokens.shape[1]

    def zeros(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.zeros((num, *t.shape[1:]), dtype=t.dtype)

    return Batch(tokens=torch.full((num, T), pad_id, dtype=torch.long),
                 response_mask=torch.zeros((num, T), dtype=torch.bool),
                 prompt_index=torch.full((num,), -1, dtype=torch.long),
                 is_demo=torch.zeros(num, dtype=torch.bool), rewards=torch.zeros(num),
                 old_logp=zeros(like.old_logp), old_entropy=zeros(like.old_entropy), ref_logp=zeros(like.ref_logp),
                 engine_logp=zeros(like.engine_logp), fields={k: zeros(v) for k, v in like.fields.items()})


def concat(a: Batch, b: Batch) -> Batch:
    def cat(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.cat([x, y])

    return Batch(tokens=torch.cat([a.tokens, b.tokens]), response_mask=torch.cat([a.response_mask, b.response_mask]),
                 prompt_index=torch.cat([a.prompt_index, b.prompt_index]), is_demo=torch.cat([a.is_demo, b.is_demo]),
                 rewards=torch.cat([a.rewards, b.rewards]), old_logp=cat(a.old_logp, b.old_logp),
                 old_entropy=cat(a.old_entropy, b.old_entropy), ref_logp=cat(a.ref_logp, b.ref_logp),
                 engine_logp=cat(a.engine_logp, b.engine_logp),
                 fields={k: torch.cat([v, b.fields[k]]) for k, v in a.fields.items()})


def micro_batches(batch: Batch, micro_batch_size: int, num_micro_batches: int, pad_id: int) -> list[Batch]:
    """Exactly `num_micro_batches` micro-batches of `micro_batch_size` rows each (pipeline schedules need equal
    shapes on every micro-batch), padding with rows that contribute nothing."""
    want = micro_batch_size * num_micro_batches
    if batch.num_sequences > want:
        raise ValueError(f"{batch.num_sequences} sequences do not fit {num_micro_batches} micro-batches of "
                         f"{micro_batch_size}")
    if batch.num_sequences < want:
        batch = concat(batch, padding_rows(batch, want - batch.num_sequences, pad_id))
    return [batch.select(slice(i * micro_batch_size, (i + 1) * micro_batch_size)) for i in range(num_micro_batches)]


def shard_groups(groups: list[Group], dp_rank: int, dp_size: int) -> tuple[list[Group], int]:
    """This rank's contiguous share of whole groups and the global index of its first group."""
    per_rank = -(-len(groups) // dp_size)
    start = min(dp_rank * per_rank, len(groups))
    return groups[start:start + per_rank], start
