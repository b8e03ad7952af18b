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


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def sequence_lengths(batch: Batch) -> list[int]:
    """Length of every row that matters (one past its last response token; 1 for a row without any): what is
    after it is right-padding, or tokens no loss or metric reads."""
    num_seq, num_pos = batch.tokens.shape
    pos = torch.arange(num_pos).expand(num_seq, num_pos)
    last = torch.where(batch.response_mask, pos, torch.full_like(pos, -1)).amax(dim=1) if num_pos else \
        torch.zeros(num_seq, dtype=torch.long)
    return (last + 1).clamp(min=1).tolist()


def plan_micro_batches(lengths: list[int], *, max_rows: int, max_tokens: int | None, multiple: int = 1,
                       uniform: bool = False) -> list[list[int]]:
    """Rows of each micro-batch, by a token budget.

    `max_tokens` None: consecutive chunks of `max_rows` rows (every micro-batch as wide as the longest row).
    Otherwise rows are sorted by length (longest first) and packed greedily while rows x padded width (its
    longest row, rounded up to `multiple`) stays within `max_tokens` and rows within `max_rows`: short sequences
    no longer pay for the longest one's padding, and the budget, not a row count, bounds activation memory.
    A row longer than the budget gets a micro-batch of its own (the config check refuses budgets below the
    longest possible sequence). `uniform`: every micro-batch the same shape (pipeline p2p without
    variable_seq_lengths): rows per micro-batch = budget // the longest padded row."""
    n = len(lengths)
    if max_tokens is None:
        return [list(range(i, min(i + max_rows, n))) for i in range(0, n, max_rows)]
    order = sorted(range(n), key=lambda i: -lengths[i])  # stable: equal lengths keep batch order
    width = [round_up(max(lengths[i], 1), multiple) for i in range(n)]
    if uniform:
        rows = max(1, min(max_rows, max_tokens // max(width, default=1)))
        return [order[i:i + rows] for i in range(0, n, rows)]
    plans: list[list[int]] = []
    for i in order:
        cur = plans[-1] if plans else None
        # rows are in decreasing length, so the micro-batch's width is that of its first row
        if cur is not None and len(cur) < max_rows and (len(cur) + 1) * width[cur[0]] <= max_tokens:
            cur.append(i)
        else:
            plans.append([i])
    return plans


def take_rows(batch: Batch, rows: list[int], multiple: int) -> Batch:
    """The micro-batch of `rows`, trimmed to its own longest sequence (rounded up to `multiple`)."""
    mb = batch.select(torch.tensor(rows, dtype=torch.long))
    width = max(sequence_lengths(mb), default=1)
    width = min(round_up(width, multiple), batch.tokens.shape[1]) if batch.tokens.shape[1] else width
    return trim_positions(mb, max(width, 2) if batch.tokens.shape[1] >= 2 else width)


def trim_positions(batch: Batch, width: int) -> Batch:
    """Keep the first `width` positions of every [S, T] tensor (padding after every real token goes)."""
    def cut(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[:, :width]

    fields = {k: (v[:, :width] if v.dim() == 2 and v.shape[1] == batch.tokens.shape[1] else v)
              for k, v in batch.fields.items()}
    return Batch(tokens=cut(batch.tokens), response_mask=cut(batch.response_mask), prompt_index=batch.prompt_index,
                 is_demo=batch.is_demo, rewards=batch.rewards, old_logp=cut(batch.old_logp),
                 old_entropy=cut(batch.old_entropy), ref_logp=cut(batch.ref_logp), engine_logp=cut(batch.engine_logp),
                 fields=fields)


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


def budget_micro_batches(batch: Batch, plan: list[list[int]], num_micro_batches: int, pad_id: int, *,
                         multiple: int = 1) -> list[Batch]:
    """The micro-batches of `plan` (from `plan_micro_batches`), each trimmed to its own width, then empty
    micro-batches (one padding row that contributes nothing) up to `num_micro_batches`: every data-parallel
    rank must run the same number, for the gradient reduction at the end of the schedule."""
    if len(plan) > num_micro_batches:
        raise ValueError(f"{len(plan)} planned micro-batches exceed the {num_micro_batches} every rank runs")
    mbs = [take_rows(batch, rows, multiple) for rows in plan if rows]
    width = max(2, multiple)
    while len(mbs) < num_micro_batches:
        mbs.append(trim_positions(padding_rows(batch, 1, pad_id), width) if batch.tokens.shape[1] >= width
                   else padding_rows(batch, 1, pad_id))
    return mbs


def shard_groups(groups: list[Group], dp_rank: int, dp_size: int) -> tuple[list[Group], int]:
    """This rank's contiguous share of whole groups and the global index of its first group."""
    per_rank = -(-len(groups) // dp_size)
    start = min(dp_rank * per_rank, len(groups))
    return groups[start:start + per_rank], start
