"""Fused weight-gradient accumulation into `weight.main_grad` (Megatron's `gradient_accumulation_fusion`).

Megatron-Core's DistributedDataParallel gives every trainable parameter a `main_grad` view into its preallocated
(usually fp32) gradient buffer, and a post-accumulate hook that does `main_grad.add_(param.grad)` for layers that
return an ordinary autograd gradient. With accumulate_into_main_grad the backward adds each block's weight
gradient straight into `main_grad` slices instead, so no `[V_local, D]` gradient is ever allocated and the extra
full-size add disappears.

The DDP hook must then not add anything again. Megatron 0.16.1 (distributed_data_parallel.py,
`_make_backward_post_hook`) adds `param.grad` only `if param.grad is not None and (not
param.grad_added_to_main_grad or param.zero_out_wgrad)`, and its own fused linear layers
(tensor_parallel/layers.py) set `weight.grad_added_to_main_grad = True` and return a dummy gradient. We do the
same (`wgrad_after_fusion`), with one saving: where `zero_out_wgrad` is set (an output layer tied to the input
embedding on the same stage) Megatron returns zeros so that the sum with the embedding's gradient is the
embedding's gradient; returning None gives that sum without a `[V, D]` zero fill. Without
`grad_added_to_main_grad` (no Megatron DDP: e.g. a hand-made `main_grad`) the weight's autograd gradient is None.
"""
from __future__ import annotations

import torch
from torch import Tensor


def wgrad_after_fusion(weight: Tensor) -> Tensor | None:
    """What the backward returns for `weight` once its gradient went into `weight.main_grad`."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True  # the DDP hook now skips its main_grad.add_(param.grad)
    if getattr(weight, "zero_out_wgrad", False):
        return None
    # Megatron's dummy: never read (the hook skips it and sets param.grad = None). It keeps param.grad non-None,
    # which the DDP hook asserts under overlap_grad_reduce, and runs the hook on the device's backward thread.
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


class GradIntoMainGrad(torch.autograd.Function):
    """Identity on the weight whose backward moves the incoming gradient into `weight.main_grad` (for the
    implementations that only produce a whole weight gradient: the reference)."""

    @staticmethod
    def forward(ctx, weight: Tensor) -> Tensor:
        ctx.weight = weight  # the Parameter itself (its main_grad / Megatron flags), not a saved copy
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.weight.main_grad.add_(grad)
        return wgrad_after_fusion(ctx.weight)
