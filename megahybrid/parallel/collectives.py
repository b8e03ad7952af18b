"""Which device a process group's collectives need, and a checking layer that catches host tensors handed to
groups that are NCCL on a GPU cluster (DESIGN rule 11) while everything here runs on gloo.

`collective_device(group)` is what code asks before building a tensor for a collective: CUDA for an NCCL group,
CPU for gloo. torch 2.13's ProcessGroupNCCL rejects CPU tensors ("No backend type associated with device type
cpu"), so statistics built with `torch.tensor(...)` must be moved there first; Megatron's `*_gloo` groups are the
deliberate CPU alternative.

The check (`MEGAHYBRID_CHECK_COLLECTIVES=1`, installed by `parallel.init.init_distributed`, set for every test by
tests/conftest.py so new code is covered without opting in):
- every group created with the default backend is taken to be NCCL on the cluster (the WORLD group too); a group
  created with an explicit `backend="gloo"` (Megatron's `*_gloo` groups) is gloo there as well;
- a TorchFunctionMode marks tensors that are certainly host tensors on a GPU cluster: made by a factory without a
  `device` (`torch.tensor`, `torch.zeros`, ...), by `.cpu()` or `.to("cpu")`, and results of ops whose tensor
  inputs are all such host tensors. Anything else (parameters, tensors made with `device=x.device`, `device="cuda"`)
  is not marked, so the check has no false alarms and misses only host tensors it cannot prove;
- while it is active, `collective_device` answers "cuda" for NCCL-intended groups (the CPU shim maps that to the
  CPU), exactly as the code would run on the cluster;
- a collective on an NCCL-intended group that gets a marked tensor raises, naming the op and the group.
"""
from __future__ import annotations

import inspect
import os
import threading
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

ENV = "MEGAHYBRID_CHECK_COLLECTIVES"
_HOST = "_megahybrid_host_tensor"
_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
              torch.linspace, torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm, torch.scalar_tensor}
_TENSOR_OPS = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all_single", "gather", "scatter", "send", "recv", "isend", "irecv")


def _is_host_device(device: Any) -> bool:
    # Only the string "cpu" is certain: a torch.device("cpu") object may be `x.device` or ParallelState.device,
    # which are CUDA on the cluster.
    return isinstance(device, str) and device.split(":")[0] == "cpu"


def _is_host(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _HOST, False)


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out


def _mark(out: Any, host: bool) -> None:
    for t in (out if isinstance(out, (list, tuple)) else (out,)):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
            setattr(t, _HOST, host)


class _HostTrackingMode(TorchFunctionMode):
    """Marks the tensors that would certainly be host tensors on a GPU cluster (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda) and out is args[0]:
            out = out.view_as(out)  # on the cluster a device move returns a new tensor; keep the input's mark
        device = kwargs.get("device", args[1] if func is torch.Tensor.to and len(args) > 1 else None)
        if func is torch.Tensor.cpu or _is_host_device(device):
            _mark(out, True)
        elif device is not None and not isinstance(device, torch.dtype) or func is torch.Tensor.cuda:
            _mark(out, False)
        elif func in _FACTORIES:
            _mark(out, True)
        else:
            inputs = _tensors(args, kwargs)
            if inputs and all(_is_host(t) for t in inputs) and out is not None:
                _mark(out, True)
        return out


class CollectiveCheck:
    """The installed layer: the group -> cluster-backend record, the tracking mode and the wrapped collectives."""

    def __init__(self) -> None:
        self._gloo_groups: list[Any] = []
        self._saved: dict[str, Any] = {}
        self._mode: _HostTrackingMode | None = None
        self._lock = threading.Lock()
        self.calls: dict[tuple[str, str], int] = {}
        """(op, cluster backend) -> number of checked calls (lets tests see that the check ran)."""

    @property
    def installed(self) -> bool:
        return self._mode is not None

    def cluster_backend(self, group: Any) -> str:
        return "gloo" if any(group is g for g in self._gloo_groups) else "nccl"

    def _wrap_new_group(self, original):
        def new_group(*args, **kwargs):
            group = original(*args, **kwargs)
            backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
            if str(backend).lower() == "gloo":
                self._gloo_groups.append(group)
            return group
        return new_group

    def _wrap_op(self, name: str, original):
        signature = inspect.signature(original)

        def checked(*args, **kwargs):
            group = signature.bind_partial(*args, **kwargs).arguments.get("group")
            backend = self.cluster_backend(group)
            self.calls[(name, backend)] = self.calls.get((name, backend), 0) + 1
            if backend == "nccl":
                bad = [t for t in _tensors(args, kwargs) if _is_host(t)]
                if bad:
                    raise RuntimeError(
                        f"dist.{name} on a process group that is NCCL on a GPU cluster got a host (CPU) tensor "
                        f"(shape {tuple(bad[0].shape)}, {bad[0].dtype}); NCCL accepts CUDA tensors only. Build it "
                        f"on megahybrid.parallel.collectives.collective_device(group), or use a gloo group "
                        f"[{ENV}=1 check]")
            return original(*args, **kwargs)
        return checked

    def install(self) -> None:
        with self._lock:
            if self.installed:
                return
            for name in ("new_group", *_TENSOR_OPS):
                self._saved[name] = getattr(dist, name)
            dist.new_group = self._wrap_new_group(self._saved["new_group"])
            for name in _TENSOR_OPS:
                setattr(dist, name, self._wrap_op(name, self._saved[name]))
            self._mode = _HostTrackingMode()
            self._mode.__enter__()

    def uninstall(self) -> None:
        with self._lock:
            if not self.installed:
                return
            self._mode.__exit__(None, None, None)
            self._mode = None
            for name, value in self._saved.items():
                setattr(dist, name, value)
            self._saved.clear()
            self._gloo_groups.clear()


CHECK = CollectiveCheck()
"""Process-wide, like the CPU shim: torch.distributed's functions are module attributes."""


def check_requested() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def install_check() -> CollectiveCheck:
    CHECK.install()
    return CHECK


def uninstall_check() -> None:
    CHECK.uninstall()


def collective_device(group: Any = None) -> torch.device:
    """The device a tensor handed to a collective on `group` must live on: CUDA for NCCL, CPU for gloo."""
    if CHECK.installed:
        backend = CHECK.cluster_backend(group)
        if backend == "nccl" and not torch.cuda.is_available():
            return torch.device("cuda")  # what the cluster does; the CPU shim maps it to the CPU
    else:
        backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
