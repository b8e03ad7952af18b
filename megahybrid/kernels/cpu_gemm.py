"""The block GEMMs of the chunked backend, routed to oneDNN for float32 on x86 CPUs.

Why: PyTorch's CPU float32 `mm`/`addmm` call MKL, and MKL picks its kernels by CPU vendor: on AMD (the benchmark
box is a Zen 5 EPYC with full-width AVX-512) it runs its AVX2 path at ~95 GFLOP/s per core, while oneDNN, which
dispatches on the ISA flags, runs the same float32 GEMM at 180-215 GFLOP/s (benchmarks/README.md). PyTorch
reaches oneDNN's float32 matmul only through `torch.ops.mkldnn._linear_pointwise` (what inductor emits for
linear layers); it computes in float32 with float32 accumulation (oneDNN's strict fp-math mode, which PyTorch keeps
unless `torch.backends.mkldnn.matmul.fp32_precision` asks for bf16/tf32), so results differ from MKL's only by
float rounding (summation order).

It has no `out=` and no beta: it returns a fresh block (the allocator hands the same memory back block after
block, so there are no page faults after the first), and accumulation is a separate in-place add. Callers
therefore always use the returned tensor. Elsewhere (float64, CUDA, no oneDNN, non-x86, MEGAHYBRID_CPU_GEMM=torch)
the same functions run torch.mm / addmm into the given buffers, with alpha/beta as usual.
"""
from __future__ import annotations

import os
import platform

import torch
from torch import Tensor


def _onednn_available() -> bool:
    choice = os.environ.get("MEGAHYBRID_CPU_GEMM", "auto")
    if choice not in ("auto", "onednn", "torch"):
        raise ValueError(f"MEGAHYBRID_CPU_GEMM={choice!r}; expected auto, onednn or torch")
    if choice == "torch":
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise  # noqa: F841 (raises where the build lacks it)
    except (AttributeError, RuntimeError):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    # auto: x86 only (on aarch64 oneDNN goes through ACL, not measured here; its default BLAS is fine there)
    return choice == "onednn" or platform.machine().lower() in ("x86_64", "amd64")


ONEDNN = _onednn_available()


def uses_onednn(x: Tensor) -> bool:
    """Whether GEMMs on tensors like `x` go to oneDNN."""
    return ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32


def _ok(x: Tensor, w: Tensor) -> bool:
    return uses_onednn(x) and x.numel() > 0 and w.numel() > 0 or w.is_mkldnn


def linear(x: Tensor, w: Tensor, out: Tensor | None = None) -> Tensor:
    """x [M, K] @ w[P, K].T -> [M, P]: a fresh tensor (oneDNN) or into `out` (torch). Use the returned tensor."""
    if _ok(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return torch.mm(x, w.T, out=out)


def pack(w: Tensor, batch: int) -> Tensor:
    """`w` [P, K] (any strides) as the `w` operand of many `linear` calls with about `batch` rows of x: on oneDNN
    reordered once into its blocked GEMM layout (else every call repacks it; measured 2-9% per GEMM), else `w`.
    The packed tensor only works as `linear`'s / `addmm_`'s `w`, for x of the dtype `w` had."""
    if uses_onednn(w) and w.numel() > 0:
        return torch.ops.mkldnn._reorder_linear_weight(w, batch)
    return w


def linear_shift(x: Tensor, w: Tensor, col: Tensor, out: Tensor) -> Tensor:
    """x @ w.T + col, col [M, 1] (a per-row shift): fresh (oneDNN) or in `out` (torch). oneDNN's fused binary-add
    post-op measured slower than a separate in-place add on this box, so it is not used."""
    if _ok(x, w):
        return linear(x, w).add_(col)
    return torch.addmm(col.expand(out.shape), x, w.T, out=out)


def addmm_(acc: Tensor, x: Tensor, w: Tensor) -> None:
    """acc += x @ w.T in place (`acc` of any float dtype, e.g. a bf16 main_grad: then via a temporary)."""
    if _ok(x, w) or acc.dtype != x.dtype:
        acc.add_(linear(x, w))
    else:
        acc.addmm_(x, w.T)
