"""Placement has one home (`Layout.node_engines`): what `megahybrid plan` prints is what each node leader starts.
And the weight-sync bucket plan and the node shares of a request (pure functions both sides rely on)."""
import re
from pathlib import Path

import pytest
import torch

from megahybrid.config.loader import load_config
from megahybrid.config.plan import describe_plan, layout_of
from megahybrid.rollout.vllm_ext import plan_buckets
from megahybrid.training.node_generation import node_engine_config, share_bounds

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(str(p) for p in (ROOT / "configs").glob("*_7b.yaml") if p.name != "base_7b.yaml")
SRFT_7B = str(ROOT / "configs/srft_7b.yaml")


def _printed_engines(text: str) -> dict[int, list[list[int]]]:
    """node -> engine GPU lists, parsed from the plan's `node k: ...; engines on GPUs a-b, c-d` lines."""
    out = {}
    for node, engines in re.findall(r"node (\d+): .*; engines on GPUs (.*)", text):
        lists = []
        for part in engines.split(", "):
            if part == "-":
                continue
            lo, _, hi = part.partition("-")
            lists.append(list(range(int(lo), int(hi or lo) + 1)))
        out[int(node)] = lists
    return out


def _engine_env(cfg, node: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each engine the node leader starts: the real RolloutPool._env, fed exactly what
    NodeGeneration gives that node's pool (no process is started)."""
    from megahybrid.rollout.pool import RolloutPool, _Slot

    node_cfg, gpu_ids = node_engine_config(cfg, node)
    pool = object.__new__(RolloutPool)
    pool.cfg, pool.cuda, pool._gpu_ids = node_cfg.rollout, node_cfg.rollout.gpus_per_worker > 0, gpu_ids
    return [pool._env(_Slot(i, "log"))["CUDA_VISIBLE_DEVICES"] for i in range(node_cfg.rollout.num_workers)]


@pytest.mark.parametrize("path, overrides", [(p, []) for p in RECIPES] + [
    (SRFT_7B, ["launch.nodes=3", "rollout.num_workers=6", "rollout.gpus_per_worker=2", "parallel.world_size=6",
               "parallel.tensor_model_parallel_size=2", "train.prompts_per_step=96"]),
    (SRFT_7B, ["launch.nodes=2", "launch.gpus_per_node=4", "rollout.num_workers=2", "rollout.gpus_per_worker=1",
                  "parallel.world_size=6", "parallel.tensor_model_parallel_size=1",
               "parallel.sequence_parallel=false", "train.prompts_per_step=96"]),
])
def test_engines_start_where_the_plan_says(path, overrides):
    cfg = load_config(path, overrides)
    lay = layout_of(cfg)
    printed = _printed_engines(describe_plan(cfg))
    assert printed, "the plan printed no node lines"
    for node, engines in printed.items():
        envs = _engine_env(cfg, node)
        assert envs == [",".join(map(str, e)) for e in engines], (node, envs, engines)
        trainer = lay.node_gpus(node)[0]
        assert not set(trainer) & {g for e in engines for g in e}  # never on the trainer's GPUs
        assert all(g < lay.gpus_per_node for e in engines for g in e)  # never on GPUs that do not exist
    # every node (not only the printed ones) starts its share: all engines of the job, none twice
    total = sum(len(lay.node_engines(n)) for n in range(lay.nodes))
    assert total == cfg.rollout.num_workers


def test_srft_7b_node_layout():
    """The headline recipe: on each of 8 nodes GPUs 0-3 train and 4-7 serve one engine each."""
    lay = layout_of(load_config(str(ROOT / "configs/srft_7b.yaml")))
    for node in range(8):
        assert lay.node_gpus(node)[0] == [0, 1, 2, 3]
        assert lay.node_engines(node) == [[4], [5], [6], [7]]


def test_cpu_nodes_split_engines_evenly():
    base = str(ROOT / "configs/tiny/srft_arith.yaml")
    lay = layout_of(load_config(base, ["launch.nodes=2", "rollout.num_workers=2"]))
    assert [lay.node_engines(n) for n in range(2)] == [[[]], [[]]]
    with pytest.raises(Exception, match="must split evenly"):
        describe_plan(load_config(base, ["launch.nodes=2", "rollout.num_workers=3"], validate=False))


def test_share_bounds_match_the_pool_shards():
    # one node with k engines splits P prompts as i*P//k; k nodes with one engine each must give the same shares
    for P in range(0, 30):
        for k in (1, 2, 3, 4):
            assert share_bounds(P, [1] * k) == [(i * P // k, (i + 1) * P // k) for i in range(k)]
    assert share_bounds(10, [3, 1]) == [(0, 7), (7, 10)]  # in proportion to the engines


def test_plan_buckets():
    t = {"a": torch.zeros(4), "b": torch.zeros(2, 3), "c": torch.zeros(3, dtype=torch.float64),
         "d": torch.zeros(100), "e": torch.zeros(1)}
    buckets = plan_buckets(t, 40)  # bytes
    assert buckets == [("float32", [("a", [4]), ("b", [2, 3])]), ("float64", [("c", [3])]),
                       ("float32", [("d", [100])]), ("float32", [("e", [1])])]
    names = [n for _, m in buckets for n, _ in m]
    assert names == list(t)  # order kept
    assert all(len(m) == 1 for _, m in plan_buckets(t, 0))
