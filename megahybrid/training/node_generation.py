"""Generation and rewards spread over the nodes: every node leader owns its node's engines and reward workers.

Design (DESIGN.md, "Generation over the nodes"): global rank 0 keeps the sampler and the dynamic-sampling loop.
For each request it splits the prompts into one contiguous share per node, in proportion to the node's engines
(`Layout.node_engines`), and sends the request to the node leaders (local rank 0) over a gloo group. Each leader
generates and scores its share with its own Generator, rank 0 gathers the shares back in prompt order. Every
prompt's sampling seed is its position in the whole request (`seed_offset`), so the samples do not depend on how
prompts are spread: 1 node x 2 engines and 2 nodes x 1 engine give the same samples (the pool splits a node's
share over its engines by the same proportional rule). With one node nothing is sent: rank 0 calls its Generator.

Leaders other than rank 0 sit in `serve()` while rank 0 works and leave it when rank 0 says `finish()`.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megahybrid.config.plan import layout_of
from megahybrid.config.schema import RunConfig
from megahybrid.parallel.nodes import NodeTopology
from megahybrid.training.generation import Generator, eval_metrics

ROLLOUT_COUNTERS = ("rollout/restarts", "rollout/timeouts")


def share_bounds(num_items: int, weights: list[int]) -> list[tuple[int, int]]:
    """Contiguous [a, b) shares of `num_items` in proportion to `weights` (the pool's own shard rule, so a node's
    share of a request is exactly what its engines would get as one node)."""
    total = sum(weights)
    edges, acc = [0], 0
    for w in weights:
        acc += w
        edges.append(num_items * acc // total)
    return list(zip(edges[:-1], edges[1:]))


def node_engine_config(cfg: RunConfig, node: int) -> tuple[RunConfig, list[int] | None]:
    """The run config of `node`'s own pool (its engine count) and the local GPU ids its engines get, in order
    (`rollout.gpus_per_worker` each), from the one placement function `Layout.node_engines`."""
    engines = layout_of(cfg).node_engines(node)
    node_cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, num_workers=len(engines)))
    return node_cfg, [g for e in engines for g in e] or None


class NodeGeneration:
    """Rank 0's interface to every node's engines (`make_groups`, `evaluate`); the other leaders `serve`."""

    def __init__(self, cfg: RunConfig, tokenizer: Any, model_dir: str, topo: NodeTopology):
        layout = layout_of(cfg)  # launch.nodes == topo.num_nodes: checked on every rank (trainer.check_node_count)
        self.topo = topo
        self.engines_per_node = [len(layout.node_engines(k)) for k in range(topo.num_nodes)]
        self.local: Generator | None = None
        if topo.is_leader:
            node_cfg, gpu_ids = node_engine_config(cfg, topo.node)
            logs = Path(cfg.train.run_dir) / "logs"
            self.local = Generator(node_cfg, tokenizer, model_dir, gpu_ids=gpu_ids,
                                   log_dir=str(logs / f"node{topo.node}" if topo.num_nodes > 1 else logs))
        self.num_reward_timeouts = 0
        self.rollout_counters: dict[str, float] = {}
        self.prompts_served = [0] * topo.num_nodes

    # ------------------------------------------------------------------------------------------- rank 0
    def make_groups(self, examples: list, plan: Any, *, seed: int) -> tuple[list, dict[str, float]]:
        t0 = time.perf_counter()
        parts = self._request("groups", examples, (plan, seed))
        groups = [g for part in parts for g in part]
        return groups, {"time/rollout_s": time.perf_counter() - t0}

    def evaluate(self, examples: list, *, n: int, temperature: float, max_new_tokens: int,
                 seed: int) -> dict[str, float]:
        if not examples:
            return {}
        parts = self._request("eval", examples, (n, temperature, max_new_tokens, seed))
        correct = [c for part_correct, _ in parts for c in part_correct]
        lengths = [x for _, part_lengths in parts for x in part_lengths]
        return eval_metrics(correct, lengths, n)

    def metrics(self) -> dict[str, float]:
        """Cumulative engine counters of every node, and (several nodes) the prompts each node has served."""
        out = dict(self.rollout_counters)
        if self.topo.num_nodes > 1:
            out.update({f"rollout/node{k}_prompts": float(n) for k, n in enumerate(self.prompts_served)})
        return out

    def finish(self) -> None:
        """Release the other leaders from `serve` (rank 0, after the last request of a phase)."""
        if self.topo.num_nodes > 1:
            self._exchange(("done",))

    def _request(self, kind: str, items: list, args: tuple) -> list:
        if self.topo.num_nodes == 1:
            result, stats = self._serve_share(kind, items, 0, args)
            self._record([stats])
            return [result]
        self._exchange(("work", kind, items, args))
        mine = self._serve_share(kind, *self._my_share(items), args)
        gathered = [None] * self.topo.num_nodes
        dist.gather_object(mine, gathered, dst=0, group=self.topo.leaders_group)
        self._record([stats for _, stats in gathered])
        return [result for result, _ in gathered]

    def _record(self, stats: list[dict]) -> None:
        self.num_reward_timeouts = sum(s["reward_timeouts"] for s in stats)
        self.rollout_counters = {k: sum(s["rollout"][k] for s in stats) for k in ROLLOUT_COUNTERS}
        for node, s in enumerate(stats):
            self.prompts_served[node] += s["num_prompts"]

    # ------------------------------------------------------------------------------------------- every leader
    def serve(self) -> None:
        """Leaders other than rank 0: answer rank 0's requests with this node's share until it finishes."""
        while True:
            msg = self._exchange(None)
            if msg[0] == "done":
                return
            _, kind, items, args = msg
            mine = self._serve_share(kind, *self._my_share(items), args)
            dist.gather_object(mine, None, dst=0, group=self.topo.leaders_group)

    def _my_share(self, items: list) -> tuple[list, int]:
        a, b = share_bounds(len(items), self.engines_per_node)[self.topo.node]
        return items[a:b], a

    def _serve_share(self, kind: str, items: list, offset: int, args: tuple) -> tuple[Any, dict]:
        gen = self.local
        if kind == "groups":
            plan, seed = args
            result = gen.make_groups(items, plan, seed=seed, seed_offset=offset)[0] if items else []
        else:
            n, temperature, max_new_tokens, seed = args
            result = gen.eval_samples(items, n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                                      seed=seed, seed_offset=offset)
        pool_metrics = gen.pool.metrics()
        return result, {"reward_timeouts": gen.num_reward_timeouts, "num_prompts": len(items),
                        "rollout": {k: pool_metrics[k] for k in ROLLOUT_COUNTERS}}

    def _exchange(self, msg: Any) -> Any:
        box = [msg]
        dist.broadcast_object_list(box, src=0, group=self.topo.leaders_group)
        return box[0]

    # ------------------------------------------------------------------------------------------- weights
    def update_weights(self, source: Any) -> float:
        """This node's engines load `source` (a folder, or HF-named tensors for the broadcast group)."""
        return self.local.pool.update_weights(source) if self.local is not None else 0.0

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
            self.local = None


def log_engine_share(gen: NodeGeneration) -> None:
    """One line at the end of a run: how many prompts each node's engines served (a node that served none is a
    placement bug worth seeing)."""
    if gen.topo.num_nodes > 1 and dist.get_rank() == 0:
        print("[megahybrid] prompts served per node: " +
              ", ".join(f"node {k}: {n}" for k, n in enumerate(gen.prompts_served)), file=sys.stderr, flush=True)
