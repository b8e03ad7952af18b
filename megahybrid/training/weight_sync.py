"""In-memory weight sync (`rollout.weight_sync: broadcast`): trainer -> node leaders -> their engines.

1. Every trainer rank takes part in gathering the policy's tensors over TP and PP (the same stream the HF export
   writes, policy_checkpoint._stream_to_writer), HF-named, onto global rank 0.
2. With several nodes, rank 0 broadcasts them to the other node leaders over the leaders' gloo group, in flat
   buckets of `rollout.sync_bucket_mb` (the bucket plan travels first, then one collective per bucket).
3. Each node leader broadcasts them to its node's engines over the pool's node-local group (NCCL between GPUs,
   gloo here), again in buckets; every engine then reports the version it holds with each generate reply.
Nothing touches the disk. Returns the bytes sent to each node (`sync/bytes`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megahybrid.parallel.nodes import NodeTopology
from megahybrid.rollout.vllm_ext import bucket_numel, plan_buckets, unflatten_bucket


class _Collector:
    """The `writer` of policy_checkpoint._stream_to_writer, keeping the tensors instead of writing them."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor


def gather_hf_tensors(policy) -> dict[str, torch.Tensor] | None:
    """Collective: the full HF-named weights on global rank 0 (None elsewhere)."""
    from megahybrid.training.policy_checkpoint import _stream_to_writer

    ps = policy.ps
    collector = _Collector() if ps.is_data_parallel_main else None
    if ps.dp_rank == 0:
        _stream_to_writer(policy, collector)
    return collector.tensors if collector is not None and ps.rank == 0 else None


def to_leaders(tensors: dict[str, torch.Tensor] | None, topo: NodeTopology, bucket_mb: int
               ) -> dict[str, torch.Tensor] | None:
    """Rank 0's tensors on every node leader (None on other ranks). One node: nothing moves."""
    if topo.num_nodes == 1 or not topo.is_leader:
        return tensors
    box = [plan_buckets(tensors, bucket_mb << 20) if tensors is not None else None]
    dist.broadcast_object_list(box, src=0, group=topo.leaders_group)
    out: dict[str, torch.Tensor] = {}
    for dtype, members in box[0]:
        if tensors is not None:
            flat = torch.cat([tensors[name].detach().reshape(-1).cpu() for name, _ in members])
        else:
            flat = torch.empty(bucket_numel(members), dtype=getattr(torch, dtype))
        dist.broadcast(flat, src=0, group=topo.leaders_group)
        out.update(unflatten_bucket(flat, members))
    return out


def num_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
