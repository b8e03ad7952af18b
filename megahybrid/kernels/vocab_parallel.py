"""Combining per-shard softmax statistics over a vocabulary-sharded LM head (SPEC.md section 5).

Every implementation reduces its own vocabulary rows to per-token partials, all relative to a local max `m`:

    m = max_j z_j      s = sum_j exp(z_j - m)      t = sum_j exp(z_j - m) * (z_j - m)

plus the target logit z_tgt (0 where the target is not in this shard) and `found` (1 where it is). From the
combined partials: lse = m + log s, entropy H = lse - E_p[z] = log s - t / s, logp = z_tgt - lse.
Keeping t relative to m avoids cancelling two large numbers when the logits are large and H is small.
Under TP this costs two all-reduces (MAX of m, then SUM of the stacked [s, t, z_tgt, found]).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def rescale(m: Tensor, s: Tensor, t: Tensor, new_m: Tensor) -> tuple[Tensor, Tensor]:
    """(s, t) relative to `m` -> relative to `new_m` >= m. Empty partials (m = -inf, s = 0) stay 0."""
    shift = m - new_m
    scale = torch.exp(shift)
    t_new = torch.where(s > 0, scale * (t + shift * s), torch.zeros_like(t))
    return scale * s, t_new


def merge_partials(a: tuple[Tensor, Tensor, Tensor], b: tuple[Tensor, Tensor, Tensor]):
    """Partials (m, s, t) of two disjoint sets of vocabulary rows -> partials of their union."""
    m = torch.maximum(a[0], b[0])
    sa, ta = rescale(*a, m)
    sb, tb = rescale(*b, m)
    return m, sa + sb, ta + tb


def combine_partials(m: Tensor, s: Tensor, t: Tensor, z_tgt: Tensor, found: Tensor, tp_group
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's partials [N] -> (logp, entropy, lse) [N] over the full vocabulary (all ranks of tp_group)."""
    if tp_group is not None:
        m_all = m.clone()
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=tp_group)
        s, t = rescale(m, s, t, m_all)
        stacked = torch.stack([s, t, z_tgt, found])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=tp_group)
        m, (s, t, z_tgt, found) = m_all, stacked.unbind(0)
    if found.numel() and not bool((found == 1).all()):
        bad = int((found != 1).nonzero()[0, 0])
        raise ValueError(f"token_logprob_entropy: target of token {bad} is in no rank's vocabulary shard "
                         f"(found {float(found[bad])} times); check vocab_start / vocab_size / targets")
    log_s = torch.log(s)
    lse = m + log_s
    return z_tgt - lse, log_s - t / s, lse


def all_reduce_hidden_grad(grad: Tensor, tp_group) -> Tensor:
    """Sum the per-shard partial hidden gradients over the TP group (in place)."""
    if tp_group is not None:
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=tp_group)
    return grad


class _GatherShards(torch.autograd.Function):
    """Differentiable all-gather of equal vocabulary shards along dim 0. Every rank then computes the same
    full-vocabulary function, so the gradient of a rank's own shard is simply its slice (no reduction)."""

    @staticmethod
    def forward(ctx, weight: Tensor, tp_group) -> Tensor:
        ctx.rank, ctx.rows = dist.get_rank(group=tp_group), weight.shape[0]
        parts = [torch.empty_like(weight) for _ in range(dist.get_world_size(group=tp_group))]
        dist.all_gather(parts, weight.contiguous(), group=tp_group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows], None


def gather_vocab_shards(weight: Tensor, vocab_start: int, tp_group) -> tuple[Tensor, int]:
    """[V_local, D] shards -> ([T * V_local, D] full head, this rank's row offset in it). Reference only:
    needs equal, contiguous shards in rank order (Megatron's layout)."""
    if tp_group is None:
        return weight, 0
    world, rank = dist.get_world_size(group=tp_group), dist.get_rank(group=tp_group)
    layout = torch.tensor([[weight.shape[0], vocab_start]], dtype=torch.int64, device=weight.device)  # NCCL: CUDA
    layouts = [torch.empty_like(layout) for _ in range(world)]
    dist.all_gather(layouts, layout, group=tp_group)
    rows = layouts[0][0, 0].item()
    expected = [[rows, r * rows] for r in range(world)]
    if [lay[0].tolist() for lay in layouts] != expected:
        raise ValueError(f"token_logprob_entropy(impl='reference'): needs equal contiguous shards in rank order "
                         f"[rows, vocab_start] = {expected}; got {[lay[0].tolist() for lay in layouts]}")
    return _GatherShards.apply(weight, tp_group), rank * rows
