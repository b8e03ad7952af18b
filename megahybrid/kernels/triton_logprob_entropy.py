"""Triton backend of token_logprob_entropy: forward + backward kernels (triton_kernels.py).

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1` set before this module
is first imported; the tests do that in a subprocess). Block sizes are fixed (no autotuning: the interpreter
cannot autotune, and the shapes of one run rarely change).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from megahybrid.kernels.function import Coefficients, apply
from megahybrid.kernels.inputs import KernelArgs

try:
    import triton

    from megahybrid.kernels import triton_kernels as K
except ImportError as err:  # pragma: no cover - triton is part of the cpu and gpu extras
    triton, K, _IMPORT_ERROR = None, None, err
else:
    _IMPORT_ERROR = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # as seen when triton.jit decorated the kernels
BLOCK_N, BLOCK_V, BLOCK_D = 64, 64, 64


def _check(hidden: Tensor) -> None:
    if K is None:
        raise RuntimeError(f"token_logprob_entropy(impl='triton') needs the `triton` package: {_IMPORT_ERROR}")
    if hidden.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("token_logprob_entropy(impl='triton') needs CUDA tensors, or CPU tensors with "
                           "TRITON_INTERPRET=1 set before megahybrid.kernels.triton_kernels is imported; "
                           f"got {hidden.device} tensors with TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}")


def _precision(dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"  # fp32 inputs: no TF32 truncation


class TritonBackend:
    def __init__(self, block_n: int = BLOCK_N, block_v: int = BLOCK_V, block_d: int = BLOCK_D):
        self.block_n, self.block_v, self.block_d = block_n, block_v, block_d

    def partials(self, hidden: Tensor, weight: Tensor, args: KernelArgs, dtype):
        _check(hidden)
        if dtype != torch.float32:
            raise ValueError(f"token_logprob_entropy(impl='triton') computes in fp32; got {hidden.dtype} inputs "
                             "(use impl='chunked' for float64)")
        hidden, weight = hidden.contiguous(), weight.contiguous()
        num_tokens, dim = hidden.shape
        m, s, t = (torch.empty(num_tokens, dtype=torch.float32, device=hidden.device) for _ in range(3))
        grid = (triton.cdiv(num_tokens, self.block_n),)
        K.partials_kernel[grid](hidden, weight, m, s, t, num_tokens, args.num_valid, dim, hidden.stride(0),
                                weight.stride(0), 1.0 / args.temperature, BLOCK_N=self.block_n,
                                BLOCK_V=self.block_v, BLOCK_D=self.block_d, PRECISION=_precision(hidden.dtype))
        return m, s, t

    def grads(self, hidden: Tensor, weight: Tensor, coef: Coefficients, args: KernelArgs, need_h, need_w,
              main_grad=None):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        num_tokens, dim = hidden.shape
        zeros = torch.zeros(num_tokens, dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        # The kernel's atomic adds accumulate on top of what GW holds: an fp32 contiguous main_grad is used as is.
        direct = main_grad is not None and main_grad.dtype == torch.float32 and main_grad.is_contiguous()
        grad_w = main_grad if direct else torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if args.num_valid > 0 and num_tokens > 0:
            grid = (triton.cdiv(num_tokens, self.block_n), triton.cdiv(args.num_valid, self.block_v))
            K.grads_kernel[grid](
                hidden, weight, coef.lse, coef.offset.contiguous(),
                zeros if coef.slope is None else coef.slope.contiguous(),
                zeros if coef.onehot is None else coef.onehot.contiguous(), coef.local_targets.contiguous(),
                grad_h, grad_w, num_tokens, args.num_valid, dim, hidden.stride(0), weight.stride(0),
                1.0 / args.temperature, NEED_H=need_h, NEED_W=need_w, BLOCK_N=self.block_n,
                BLOCK_V=self.block_v, BLOCK_D=self.block_d, PRECISION=_precision(hidden.dtype))
        if main_grad is not None:
            if not direct:
                main_grad.add_(grad_w)
            return (grad_h.to(hidden.dtype) if need_h else None), None
        return (grad_h.to(hidden.dtype) if need_h else None), (grad_w.to(weight.dtype) if need_w else None)


def triton_logprob_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, args: KernelArgs):
    """hidden [N, D], weight [V_local, D], targets [N] -> (logp, entropy, lse), each [N] fp32."""
    _check(hidden)
    return apply(hidden, weight, targets, args, TritonBackend())
