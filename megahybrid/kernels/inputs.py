"""Argument checking shared by every implementation of `token_logprob_entropy`."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class KernelArgs:
    """Checked, implementation-independent arguments."""

    vocab_start: int
    """Global vocabulary id of this shard's row 0."""
    num_valid: int
    """Rows of this shard that are real vocabulary (the rest, at the end, is padding)."""
    vocab_size: int | None
    """True global vocabulary size; None = no padding anywhere."""
    temperature: float
    tp_group: object
    chunk_size: int | None
    reduce_hidden_grad: bool
    accumulate_into_main_grad: bool = False
    """Backward adds the weight gradient into `weight.main_grad` (see `fused_wgrad.py`) instead of returning it."""


def _fail(msg: str) -> None:
    raise ValueError(f"token_logprob_entropy: {msg}")


def check_inputs(hidden: Tensor, weight: Tensor, targets: Tensor, *, vocab_start: int, vocab_size: int | None,
                 temperature: float, tp_group, chunk_size: int | None, reduce_hidden_grad: bool,
                 accumulate_into_main_grad: bool | None = None) -> KernelArgs:
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        _fail(f"expected hidden [N, D], weight [V_local, D], targets [N]; got {tuple(hidden.shape)}, "
              f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != targets.shape[0]:
        _fail(f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
              f"targets {tuple(targets.shape)}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        _fail(f"hidden and weight must share a floating dtype; got {hidden.dtype} and {weight.dtype}")
    if targets.dtype not in (torch.int64, torch.int32):
        _fail(f"targets must be int64/int32 token ids; got {targets.dtype}")
    if not temperature > 0:
        _fail(f"temperature must be > 0; got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        _fail(f"chunk_size must be >= 1 or None; got {chunk_size}")
    if vocab_start < 0:
        _fail(f"vocab_start must be >= 0; got {vocab_start}")
    num_local = weight.shape[0]
    if vocab_size is None:
        num_valid = num_local
        if tp_group is None and targets.numel() and int(targets.max()) >= num_local + vocab_start:
            _fail(f"a target id {int(targets.max())} is outside the vocabulary [0, {vocab_start + num_local})")
    else:
        num_valid = max(0, min(num_local, vocab_size - vocab_start))
        if targets.numel() and int(targets.max()) >= vocab_size:
            _fail(f"a target id {int(targets.max())} is >= vocab_size={vocab_size} (padding rows are excluded)")
    if tp_group is None and vocab_start != 0:
        _fail(f"vocab_start={vocab_start} without a tp_group: a single shard must start at id 0")
    if targets.numel() and int(targets.min()) < 0:
        _fail(f"target ids must be >= 0 (mask ignored positions after the op); got {int(targets.min())}")
    return KernelArgs(vocab_start=vocab_start, num_valid=num_valid, vocab_size=vocab_size,
                      temperature=float(temperature), tp_group=tp_group, chunk_size=chunk_size,
                      reduce_hidden_grad=reduce_hidden_grad,
                      accumulate_into_main_grad=_check_main_grad(weight, accumulate_into_main_grad))


def _check_main_grad(weight: Tensor, accumulate: bool | None) -> bool:
    """Resolve accumulate_into_main_grad (None = whenever the weight carries a `main_grad` buffer)."""
    main_grad = getattr(weight, "main_grad", None)
    if accumulate is None:
        accumulate = main_grad is not None
    if not accumulate:
        return False
    if main_grad is None:
        _fail("accumulate_into_main_grad=True but the weight has no `main_grad` tensor (Megatron DDP's "
              "preallocated gradient buffer); pass accumulate_into_main_grad=False (or None) to get weight.grad")
    if not isinstance(main_grad, Tensor) or main_grad.shape != weight.shape or main_grad.device != weight.device \
            or not main_grad.is_floating_point():
        _fail(f"weight.main_grad must be a floating tensor shaped like the weight {tuple(weight.shape)} on "
              f"{weight.device}; got {type(main_grad).__name__} "
              f"{tuple(getattr(main_grad, 'shape', ()))} on {getattr(main_grad, 'device', None)}")
    return True
