"""The autograd.Function shared by every fused implementation (chunked, triton, te_fp8).

A backend supplies the two heavy loops over [token, vocabulary] blocks:
    partials(hidden, weight, args, dtype) -> (m, s, t)  [N] each, this shard's valid rows (vocab_parallel.py)
    grads(hidden, weight, coef, args, need_h, need_w, main_grad) -> (grad_hidden [N, D] | None,
                                                                    grad_weight [V_local, D] | None)
where a `main_grad` tensor (accumulate_into_main_grad, fused_wgrad.py) means: add the weight gradient into it
and return None for grad_weight.
Everything else (target logits, the TP combine, gradient coefficients, the hidden-gradient all-reduce) is here.

Gradient coefficients (SPEC.md section 5): with z = h.w / T, log p = z - lse and H the entropy,
    d logp/dz_j = onehot_j - p_j,   d H/dz_j = -p_j (log p_j + H),   d lse/dz_j = p_j,
so for upstream (g_logp, g_H, g_lse) one block's logit gradient, already divided by T, is
    dz = p * (offset + slope * log p) + onehot * g_logp / T,
    offset = -(g_logp - g_lse + g_H * H) / T,   slope = -g_H / T.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megahybrid.kernels.fused_wgrad import wgrad_after_fusion
from megahybrid.kernels.inputs import KernelArgs
from megahybrid.kernels.vocab_parallel import all_reduce_hidden_grad, combine_partials


TARGET_CHUNK = 1024  # tokens per gather of target rows of the weight


@dataclass
class Coefficients:
    """Per-token [N] coefficients of the block gradient (see the module docstring); None = term absent."""

    lse: Tensor
    offset: Tensor
    slope: Tensor | None  # None when the entropy is not used
    onehot: Tensor | None  # g_logp / T; None when logp is not used
    local_targets: Tensor  # target id - vocab_start (int64); outside [0, num_valid) = not in this shard


def target_logits(hidden: Tensor, weight: Tensor, targets: Tensor, args: KernelArgs, dtype):
    """Target logit z_tgt [N] (0 where the target is not among this shard's valid rows) and found [N] (0/1)."""
    local = targets.long() - args.vocab_start
    found = (local >= 0) & (local < args.num_valid)
    rows = local.clamp(0, max(args.num_valid - 1, 0))
    z_tgt = torch.empty(targets.shape, dtype=dtype, device=hidden.device)
    for n0 in range(0, targets.shape[0], TARGET_CHUNK):  # gathered weight rows stay [TARGET_CHUNK, D]
        sl = slice(n0, n0 + TARGET_CHUNK)
        z_tgt[sl] = torch.linalg.vecdot(hidden[sl].to(dtype), weight[rows[sl]].to(dtype))
    z_tgt = z_tgt / args.temperature
    return torch.where(found, z_tgt, torch.zeros_like(z_tgt)), found.to(dtype)


def coefficients(grads, entropy: Tensor, lse: Tensor, targets: Tensor, args: KernelArgs) -> Coefficients:
    g_logp, g_entropy, g_lse = grads
    inv_t = 1.0 / args.temperature
    c = torch.zeros_like(entropy)
    if g_logp is not None:
        c = c + g_logp
    if g_lse is not None:
        c = c - g_lse
    if g_entropy is not None:
        c = c + g_entropy * entropy
    return Coefficients(lse=lse, offset=-c * inv_t,
                        slope=None if g_entropy is None else -g_entropy * inv_t,
                        onehot=None if g_logp is None else g_logp * inv_t,
                        local_targets=targets.long() - args.vocab_start)


class LogprobEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, args: KernelArgs, backend):
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # statistics never below fp32
        m, s, t = backend.partials(hidden, weight, args, dtype)
        z_tgt, found = target_logits(hidden, weight, targets, args, dtype)
        logp, entropy, lse = combine_partials(m, s, t, z_tgt, found, args.tp_group)
        ctx.save_for_backward(hidden, weight, targets, entropy, lse)
        ctx.args, ctx.backend = args, backend
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: skip its terms
        ctx.mark_non_differentiable(targets)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, g_logp, g_entropy, g_lse):
        hidden, weight, targets, entropy, lse = ctx.saved_tensors
        args = ctx.args
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logp is None and g_entropy is None and g_lse is None) or not (need_h or need_w):
            return None, None, None, None, None
        coef = coefficients((g_logp, g_entropy, g_lse), entropy, lse, targets, args)
        fuse = need_w and args.accumulate_into_main_grad
        grad_h, grad_w = ctx.backend.grads(hidden, weight, coef, args, need_h, need_w,
                                           weight.main_grad if fuse else None)
        if grad_h is not None and args.reduce_hidden_grad:
            all_reduce_hidden_grad(grad_h, args.tp_group)
        return grad_h, wgrad_after_fusion(weight) if fuse else grad_w, None, None, None


def apply(hidden: Tensor, weight: Tensor, targets: Tensor, args: KernelArgs, backend):
    """-> (logp, entropy, lse), each [N] in fp32 or wider."""
    return LogprobEntropyFunction.apply(hidden, weight, targets, args, backend)
