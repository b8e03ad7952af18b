"""Fused per-token log-prob + entropy of an LM head, without materialising `[N, V]` logits (SPEC.md section 5).

One public op, `token_logprob_entropy`, with interchangeable implementations:

- `reference`: naive and readable (full logits, log_softmax); the test oracle.
- `chunked`:   pure-torch `autograd.Function` over token x vocabulary blocks, backward recomputes each block;
               the CPU default (float32 block GEMMs on oneDNN on x86, `cpu_gemm.py`: 2x MKL on AMD CPUs).
- `triton`:    forward + backward Triton kernels (GPU; on CPU only under `TRITON_INTERPRET=1`).
- `te_fp8`:    the chunked algorithm with the LM-head GEMMs in FP8 through Transformer Engine (Hopper GPUs).
- `auto`:      `default_impl(device)`: triton on CUDA (bf16 operands read as they are, fp32 accumulation and
               outputs; `chunked` would upcast the whole head to fp32 GEMMs), chunked elsewhere.

Tensor parallelism (`tp_group`): each rank passes its vocabulary shard of the LM head; the per-shard partial
statistics are combined with all-reduces (`vocab_parallel.py`).

Hidden-state gradient contract under TP: the op returns the FULL gradient w.r.t. `hidden` (it all-reduces the
per-shard partial gradients over `tp_group` itself). So do NOT also wrap `hidden` in Megatron's
`copy_to_tensor_model_parallel_region` (that would sum the gradient twice). If the caller already reduces the
hidden gradient itself (e.g. sequence parallelism, gathering `hidden` with a reduce-scatter backward), pass
`reduce_hidden_grad=False` to get this rank's partial gradient instead. Weight gradients are always those of
this rank's own shard.

Weight-gradient accumulation fusion (`accumulate_into_main_grad`, fused_wgrad.py): when the weight carries a
preallocated `main_grad` buffer (Megatron DDP's gradient buffer), the backward adds the weight gradient into it
block by block instead of returning a `[V_local, D]` autograd gradient, and follows Megatron's contract with the
DDP hook (`grad_added_to_main_grad`) so nothing is counted twice.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

IMPLS = ("auto", "reference", "chunked", "triton", "te_fp8")


def default_impl(device, dtype=None) -> str:
    """What impl="auto" runs for `dtype` tensors on `device`: triton on CUDA when the package is there (it
    computes in fp32, so not for float64), else chunked."""
    import importlib.util

    import torch

    on_cuda = getattr(device, "type", device) == "cuda"
    if on_cuda and dtype != torch.float64 and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "chunked"


@dataclass
class LogprobEntropy:
    logp: Tensor  # [N] log-prob of each target under softmax(logits / temperature) over the FULL vocab
    entropy: Tensor  # [N] full-vocabulary entropy of that distribution
    lse: Tensor  # [N] log-sum-exp of logits / temperature over the full vocab


def token_logprob_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, vocab_start: int = 0,
                          vocab_size: int | None = None, temperature: float = 1.0, tp_group=None,
                          impl: str = "auto", chunk_size: int | None = None,
                          reduce_hidden_grad: bool = True,
                          accumulate_into_main_grad: bool | None = None) -> LogprobEntropy:
    """hidden [N, D]; weight = this rank's LM-head shard [V_local, D] holding global vocab ids
    [vocab_start, vocab_start + V_local); targets [N] global ids (may live in another rank's shard);
    vocab_size = true (unpadded) vocabulary size: rows with global id >= vocab_size are padding and excluded;
    tp_group = tensor-parallel process group (None = no TP). Differentiable w.r.t. hidden and weight for both logp
    and entropy. Never materialises [N, V] (except impl="reference", the oracle).

    Outputs are float32 (float64 for float64 inputs) whatever the input dtype; gradients come back in the inputs'
    dtypes. chunk_size: tokens and vocabulary rows per block (None = a tuned default; te_fp8: tokens per chunk;
    triton: fixed 64 x 64 tiles).
    reduce_hidden_grad: all-reduce the hidden gradient over tp_group (see the module docstring).
    accumulate_into_main_grad: True = backward adds the weight gradient into `weight.main_grad` (same shape;
    any float dtype) and the weight's autograd gradient is None (or Megatron DDP's dummy, see fused_wgrad.py);
    False = ordinary `weight.grad`; None (default) = True exactly when the weight has a `main_grad` attribute.
    """
    from megahybrid.kernels.inputs import check_inputs

    args = check_inputs(hidden, weight, targets, vocab_start=vocab_start, vocab_size=vocab_size,
                        temperature=temperature, tp_group=tp_group, chunk_size=chunk_size,
                        reduce_hidden_grad=reduce_hidden_grad,
                        accumulate_into_main_grad=accumulate_into_main_grad)
    if impl == "auto":
        impl = default_impl(hidden.device, hidden.dtype)
    if impl == "reference":
        from megahybrid.kernels.reference import reference_logprob_entropy as fn
    elif impl == "chunked":
        from megahybrid.kernels.chunked import chunked_logprob_entropy as fn
    elif impl == "triton":
        from megahybrid.kernels.triton_logprob_entropy import triton_logprob_entropy as fn
    elif impl == "te_fp8":
        from megahybrid.kernels.fp8 import fp8_logprob_entropy as fn
    else:
        raise ValueError(f"token_logprob_entropy: unknown impl={impl!r}; expected one of {', '.join(IMPLS)}")
    if impl == "reference" and args.accumulate_into_main_grad and weight.requires_grad:
        from megahybrid.kernels.fused_wgrad import GradIntoMainGrad

        weight = GradIntoMainGrad.apply(weight)  # the oracle builds the whole gradient, then moves it
    logp, entropy, lse = fn(hidden, weight, targets, args)
    return LogprobEntropy(logp=logp, entropy=entropy, lse=lse)


__all__ = ["IMPLS", "LogprobEntropy", "default_impl", "token_logprob_entropy"]
