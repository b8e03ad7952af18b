"""Group statistics over the sequences of a prompt (SPEC.md section 2 and the conventions of section 9).

A group is the set of *member* sequences sharing a `prompt_index`: the K rollouts (plain GRPO advantages) or the
K rollouts plus the prompt's demos (augmented group, SRFT Eq. 6-7). Groups are whole on a data-parallel rank, so
everything here is local. All results are constants (no gradient).
"""
from __future__ import annotations

import torch
from torch import Tensor


def dense_groups(prompt_index: Tensor) -> tuple[Tensor, int]:
    """Map step-global prompt ids [S] to dense group ids 0..G-1 [S] (and G)."""
    if prompt_index.numel() == 0:
        return prompt_index.new_zeros(0), 0
    uniq, gid = torch.unique(prompt_index, return_inverse=True)
    return gid, int(uniq.numel())


def _group_sum(values: Tensor, gid: Tensor, num_groups: int) -> Tensor:
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, gid, values)


def group_extreme(values: Tensor, gid: Tensor, num_groups: int, member: Tensor, reduce: str) -> Tensor:
    """[G] max or min (`reduce` = 'amax' / 'amin') of `values` over each group's members; -inf/+inf if none."""
    fill = float("-inf") if reduce == "amax" else float("inf")
    out = torch.full((num_groups,), fill, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, gid[member], values[member], reduce=reduce, include_self=True)


def group_moments(rewards: Tensor, prompt_index: Tensor, member: Tensor) -> dict[str, Tensor]:
    """Per-sequence statistics of each sequence's group: `count`, `mean`, unbiased `std`, `constant` (all member
    rewards exactly equal, including groups of 0 or 1 members). All [S]."""
    r = rewards.detach()
    gid, num_groups = dense_groups(prompt_index)
    m = member.to(r.dtype)
    count = _group_sum(m, gid, num_groups)
    mean = _group_sum(r * m, gid, num_groups) / count.clamp(min=1)
    dev = (r - mean[gid]) * m
    std = (_group_sum(dev * dev, gid, num_groups) / (count - 1).clamp(min=1)).sqrt()
    hi = group_extreme(r, gid, num_groups, member, "amax")
    lo = group_extreme(r, gid, num_groups, member, "amin")
    constant = (count <= 1) | (hi == lo)
    return {"count": count[gid], "mean": mean[gid], "std": std[gid], "constant": constant[gid]}


def group_advantages(rewards: Tensor, prompt_index: Tensor, member: Tensor, norm_by_std: bool = True,
                     eps: float = 1e-6) -> Tensor:
    """[S] GRPO advantage `(R - mean) / (std + eps)` (or `R - mean` without std normalisation) over each group's
    members; 0 for non-members and for every sequence of a constant-reward group."""
    g = group_moments(rewards, prompt_index, member)
    adv = rewards.detach() - g["mean"]
    if norm_by_std:
        adv = adv / (g["std"] + eps)
    return torch.where(member & ~g["constant"], adv, torch.zeros_like(adv))


def keep_groups(rewards: Tensor, prompt_index: Tensor, member: Tensor, min_std: float) -> Tensor:
    """[S] bool dynamic-sampling filter: a sequence is kept iff its group's member rewards are not all equal and
    their unbiased std is >= `min_std` (SPEC 9)."""
    g = group_moments(rewards, prompt_index, member)
    return ~g["constant"] & (g["std"] >= min_std)


def per_group_sum(values: Tensor, prompt_index: Tensor) -> Tensor:
    """[G] sum of `values` [S] over each group (dense group order of `dense_groups`)."""
    gid, num_groups = dense_groups(prompt_index)
    return _group_sum(values, gid, num_groups)


def group_any(flags: Tensor, prompt_index: Tensor) -> Tensor:
    """[S] bool: some sequence of the sequence's group has `flags` set."""
    gid, _ = dense_groups(prompt_index)
    return (per_group_sum(flags.to(torch.float64), prompt_index) > 0)[gid]
