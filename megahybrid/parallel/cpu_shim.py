"""The one place that makes Megatron-Core run without CUDA (ENVIRONMENT.md, "Megatron-Core on CPU").

Megatron-Core 0.16 hard-codes CUDA in a few places that the CPU/gloo path still reaches. Each fix below was
verified on this machine kind:

- `torch.cuda.current_device()` (layers, grad buffers, p2p shape exchange)  -> returns the CPU device;
- `torch.cuda.synchronize()` (p2p, DDP buffer helpers)                      -> no-op;
- `device="cuda"` literals (pipeline schedules, grad clipping, optimizer scalars) and `Tensor.cuda()` (tied
  embeddings, distributed optimizer)                                          -> a TorchFunctionMode maps them to CPU;
- `param.type() == "torch.cuda.FloatTensor"` asserts (grad clipping, (distributed) optimizer)
                                                                              -> the same mode reports CUDA type names;
- activation recompute saving/restoring the CUDA RNG state                   -> routed to the CPU generator.

The model-parallel RNG tracker is seeded by `megahybrid.parallel.init` with `inference_rng_tracker=True` on CPU
(its `fork()` is a no-op; dropout is 0 in our models), which avoids the CUDA generator entirely.

`apply()` is idempotent and `undo()` restores every patched attribute; `cpu_shim()` is the context-manager form
for tests. `apply_if_needed()` does nothing when CUDA is present.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device requests to CPU and reports CUDA tensor type names (what Megatron's asserts expect)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to:
            args = tuple(_CPU if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


def _current_device() -> torch.device:
    return _CPU


def _synchronize(device: Any = None) -> None:
    return None


def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _set_cpu_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


class CpuShim:
    """Patches and a torch-function mode; `apply()` twice is a no-op, `undo()` restores the originals."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []
        self._mode: _CudaToCpuMode | None = None
        self._lock = threading.Lock()

    @property
    def applied(self) -> bool:
        return self._mode is not None

    def _patch(self, owner: Any, name: str, value: Any) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def apply(self) -> None:
        with self._lock:
            if self.applied:
                return
            from megatron.core.tensor_parallel import random as mp_random

            self._patch(torch.cuda, "current_device", _current_device)
            self._patch(torch.cuda, "synchronize", _synchronize)
            self._patch(mp_random, "_get_cuda_rng_state", _get_cpu_rng_state)
            self._patch(mp_random, "_set_cuda_rng_state", _set_cpu_rng_state)
            self._mode = _CudaToCpuMode()
            self._mode.__enter__()

    def undo(self) -> None:
        with self._lock:
            if not self.applied:
                return
            self._mode.__exit__(None, None, None)
            self._mode = None
            for owner, name, value in reversed(self._saved):
                setattr(owner, name, value)
            self._saved.clear()


_SHIM = CpuShim()
"""The process-wide shim: the patches are process-wide by nature (module attributes), so is their record."""


def apply() -> None:
    """Apply the CPU shim (idempotent)."""
    _SHIM.apply()


def undo() -> None:
    """Remove the CPU shim (no-op when not applied)."""
    _SHIM.undo()


def is_applied() -> bool:
    return _SHIM.applied


def apply_if_needed() -> bool:
    """Apply the shim when CUDA is absent; returns whether it is active."""
    if not torch.cuda.is_available():
        apply()
    return is_applied()


@contextlib.contextmanager
def cpu_shim() -> Iterator[CpuShim]:
    """Context manager: the shim is active inside, and removed on exit unless it was active before."""
    was_applied = is_applied()
    apply()
    try:
        yield _SHIM
    finally:
        if not was_applied:
            undo()
