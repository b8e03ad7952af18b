"""Which node this trainer rank is on, and the group of node leaders (local rank 0 of every node).

Node leaders own their node's rollout engines and reward workers (training/generation.py). The topology comes
from torchrun's environment (GROUP_RANK = node rank, LOCAL_RANK, LOCAL_WORLD_SIZE), so the same code runs under
`slurm/launch_node.sh` on 8 real nodes and under two launchers with a loopback rendezvous on one machine; outside
torchrun the job is one node. Every rank's view is gathered once and checked, so a launcher that numbered nodes
differently fails at start, not with a hang later.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist


@dataclass
class NodeTopology:
    node: int
    """This rank's node index (0 .. num_nodes-1)."""
    num_nodes: int
    local_rank: int
    leader_ranks: list[int]
    """Global rank of each node's leader, by node."""
    leaders_group: object | None
    """gloo group of the leaders (None with one node): prompts, groups and weights travel between nodes on it.
    gloo deliberately: it carries pickled objects and, on CPU, the weight buckets; GPU weight buckets are moved
    to the host first (see training/weight_sync.py)."""

    @property
    def is_leader(self) -> bool:
        return self.local_rank == 0


def _env_view(rank: int) -> tuple[int, int]:
    if "GROUP_RANK" in os.environ and "LOCAL_RANK" in os.environ:
        return int(os.environ["GROUP_RANK"]), int(os.environ["LOCAL_RANK"])
    return 0, rank  # one node: the local launcher or a single process


def node_topology() -> NodeTopology:
    """Collective over the default group (every rank calls it once, after init_distributed)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    node, local = _env_view(rank)
    views = [(node, local)]
    if world > 1:
        views = [None] * world
        dist.all_gather_object(views, (node, local))
    num_nodes = max(n for n, _ in views) + 1
    leaders = [next((r for r, (n, lr) in enumerate(views) if n == k and lr == 0), None) for k in range(num_nodes)]
    if None in leaders:
        missing = [k for k, r in enumerate(leaders) if r is None]
        raise RuntimeError(f"node topology: no rank with LOCAL_RANK 0 on node(s) {missing} (views {views})")
    group = dist.new_group(ranks=leaders, backend="gloo") if num_nodes > 1 else None
    return NodeTopology(node=node, num_nodes=num_nodes, local_rank=local, leader_ranks=leaders,
                        leaders_group=group)
