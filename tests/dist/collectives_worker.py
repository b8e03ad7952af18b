"""Worker of test_collective_devices.py: two gloo ranks with the collective check installed run the trainer's and
step's statistics reductions, and check each result against the sum/max computed here from both ranks' inputs."""
from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist

from megahybrid.parallel import collectives
from megahybrid.parallel.cpu_shim import cpu_shim
from megahybrid.training import step
from megahybrid.training.batching import Group, Sequence, collate
from megahybrid.training.signals import agree
from megahybrid.training.trainer import Trainer


def _batch(rank: int):
    """Rank 0: 3 sequences, rank 1: 1 (so the micro-batch count needs the MAX over ranks)."""
    seqs = [Sequence(prompt_ids=[1, 2], response_ids=[3] * (i + 1), is_demo=False, reward=1.0)
            for i in range(3 if rank == 0 else 1)]
    return collate([Group(0, "p", [1, 2], "a", seqs)], prompt_offset=0, pad_id=0)


def worker(rank: int, world: int, store_path: str, out_path: str) -> None:
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    with cpu_shim():
        check = collectives.install_check()
        try:
            dp_group = dist.new_group(list(range(world)))  # default backend: NCCL on a GPU cluster
            gloo_group = dist.new_group(list(range(world)), backend="gloo")
            fake = SimpleNamespace(ps=SimpleNamespace(dp_size=world, dp_group=dp_group, pp_size=1),
                                   cfg=SimpleNamespace(train=SimpleNamespace(micro_batch_size=1)), pad_id=0,
                                   micro_batch_tokens=None, _length_multiple=lambda: 1)
            fake._micro_batch_plan = partial(Trainer._micro_batch_plan, fake)
            batch = _batch(rank)
            results = {
                # the statistics of algorithm.prepare and the num_tokens of train_one_step
                "stats": Trainer._all_reduce_sum(fake, {"n": batch.response_mask.sum().double(),
                                                        "v": torch.tensor([1.0, float(rank)])}),
                "num_micro_batches": len(Trainer._micro_batches(fake, batch)),
                "payload": step.sum_payload_metrics(
                    [{"loss": 0.5, "metrics": {"a": float(rank + 1)}}], dp_group),
                "agree": agree(rank == 1, dp_group),
            }
            # the deliberate alternative: a gloo group takes host tensors on a cluster too
            host = torch.tensor([float(rank)])
            dist.all_reduce(host, group=gloo_group)
            results["gloo_sum"] = host.item()
            results["checked"] = dict(check.calls)
        finally:
            collectives.uninstall_check()
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()

