"""Vocabulary-parallel token_logprob_entropy: TP=2 and TP=4 (gloo, one process per rank) equal TP=1.

Cases: vocabulary not divisible by TP (padded rows), a shard made only of padding, targets in other ranks'
shards, temperature != 1, blocks that divide nothing. The reference (all-gather), chunked and (TP=2, through
Triton's CPU interpreter) triton implementations.
"""
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))  # the worker module, also under --import-mode=importlib
from kernels_tp_worker import megatron_ddp_worker, worker  # noqa: E402

CASES = {
    2: [dict(num_tokens=11, dim=6, vocab_size=23, rows=12, temperature=0.7, chunk_size=5, seed=1)],
    # 4 shards of 5 rows for 13 ids: shard 2 holds 3 real rows + 2 padding, shard 3 is all padding
    4: [dict(num_tokens=9, dim=5, vocab_size=13, rows=5, temperature=1.3, chunk_size=4, seed=2),
        dict(num_tokens=7, dim=4, vocab_size=20, rows=5, temperature=1.0, chunk_size=None, seed=3)],
}


IMPLS = {2: ["reference", "chunked", "triton"], 4: ["reference", "chunked"]}  # triton: CPU interpreter


@pytest.mark.dist
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
def test_tp_equals_tp1(world, tmp_path):
    if "triton" in IMPLS[world]:
        pytest.importorskip("triton", reason="the `triton` package (cpu extra) is not installed")
    mp.spawn(worker, args=(world, str(tmp_path / "store"), IMPLS[world], CASES[world]), nprocs=world, join=True)


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_megatron_ddp_main_grad_counted_once(tmp_path):
    """accumulate_into_main_grad inside real Megatron-Core DDP (TP=2, gloo): main_grad = reference gradient."""
    mp.spawn(megatron_ddp_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)
