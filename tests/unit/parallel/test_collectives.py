"""The collective check (megahybrid.parallel.collectives) on a one-rank gloo group: which tensors it proves to be
host tensors on a GPU cluster, and that it raises for them on NCCL-intended groups only."""
import pytest
import torch
import torch.distributed as dist

from megahybrid.parallel import collectives
from megahybrid.parallel.cpu_shim import cpu_shim


@pytest.fixture
def check(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    with cpu_shim():
        check = collectives.install_check()
        try:
            yield check
        finally:
            collectives.uninstall_check()
    dist.destroy_process_group()


def test_host_tensors_are_refused_on_nccl_groups_only(check):
    nccl_group, gloo_group = dist.new_group([0]), dist.new_group([0], backend="gloo")
    host = torch.tensor([1.0, 2.0]).double().reshape(-1)  # a factory without device, then ops on it
    with pytest.raises(RuntimeError, match="NCCL on a GPU cluster got a host"):
        dist.all_reduce(host, group=nccl_group)
    with pytest.raises(RuntimeError, match="host"):
        dist.broadcast(torch.zeros(2).cpu(), 0)  # the WORLD group is NCCL on a cluster too
    dist.all_reduce(host, group=gloo_group)
    placed = host.to(collectives.collective_device(nccl_group))
    dist.all_reduce(placed, group=nccl_group)
    assert placed.tolist() == [1.0, 2.0]
    assert collectives.collective_device(nccl_group).type == "cuda"  # what runs there; the shim maps it
    assert collectives.collective_device(gloo_group).type == "cpu"
    assert check.calls == {("all_reduce", "nccl"): 2, ("broadcast", "nccl"): 1, ("all_reduce", "gloo"): 1}


def test_tensors_not_proven_host_pass(check):
    weight = torch.nn.Parameter(torch.ones(2, 2))
    derived = weight.detach() * torch.tensor(2.0)  # a parameter (on the GPU there) mixed with a host scalar
    like = torch.zeros(2, device=derived.device)  # device=x.device follows x
    for t in (derived, like, torch.ones(2, device="cuda")):
        dist.all_reduce(t)
    assert derived.tolist() == [[2.0, 2.0], [2.0, 2.0]]
