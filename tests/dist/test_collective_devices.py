"""Defect 1 of issue 12: tensors handed to collectives on groups that are NCCL on a GPU cluster must not be host
tensors. Two gloo ranks run the trainer's and step's statistics reductions with the collective check
(megahybrid.parallel.collectives) installed; the check raises on a host tensor, and the results must equal the
reductions computed here from both ranks' inputs."""
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from collectives_worker import worker  # noqa: E402


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_statistics_reductions_use_the_group_device(tmp_path):
    out = tmp_path / "out.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    r = torch.load(out)
    # rank 0: responses of 1, 2, 3 tokens; rank 1: 1 token
    assert r["stats"]["n"].item() == 7.0 and r["stats"]["n"].dtype == torch.float64
    assert r["stats"]["v"].tolist() == [2.0, 1.0]
    assert r["num_micro_batches"] == 3  # max(3, 1) sequences at micro_batch_size 1
    assert r["payload"] == (1.0, {"a": 3.0})
    assert r["agree"] is True
    assert r["gloo_sum"] == 1.0
    checked = r["checked"]
    assert checked[("all_reduce", "nccl")] == 4 and checked[("all_reduce", "gloo")] == 1
