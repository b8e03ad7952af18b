"""Pure-torch blocked log-prob + entropy: an `autograd.Function` over [token, vocabulary] blocks (CPU default).

Forward keeps only per-token partials (vocab_parallel.py) and the saved inputs; backward recomputes each block's
logits. With z = h.w / T, p = softmax(z), log p = z - lse and H the entropy, the per-logit gradients are

    d logp / dz_j = onehot_j - p_j        d H / dz_j = -p_j (log p_j + H)        d lse / dz_j = p_j

and each is multiplied by 1/T on the way to h and w. One block is  dz = -p * (c + g_H * log p) + g_logp * onehot
with per-token c = g_logp - g_lse + g_H * H, so the whole backward is one exp and three in-place passes per block.
"""
from __future__ import annotations

import torch
from torch import Tensor

from megahybrid.kernels.inputs import KernelArgs
from megahybrid.kernels.vocab_parallel import all_reduce_hidden_grad, combine_partials, merge_partials

# Tokens and vocabulary rows per block. 256 x 2048 fp32 = 2 MiB per block buffer (two buffers): large enough for
# efficient GEMMs at D ~ 1k, small enough to stay in cache for the elementwise passes (benchmarks/logprob_entropy.py).
DEFAULT_TOKEN_CHUNK = 256
DEFAULT_VOCAB_CHUNK = 2048


class TorchGemms:
    """The three LM-head GEMMs of a block; `fp8.py` swaps in Transformer Engine FP8 GEMMs."""

    def logits(self, h: Tensor, w: Tensor, out: Tensor) -> Tensor:  # [n, D] x [v, D] -> [n, v]
        return torch.mm(h, w.T, out=out)

    def grad_hidden(self, dz: Tensor, w: Tensor, acc: Tensor) -> None:  # acc[n, D] += dz[n, v] @ w[v, D]
        acc.addmm_(dz, w)

    def grad_weight(self, dz: Tensor, h: Tensor, acc: Tensor) -> None:  # acc[v, D] += dz.T[v, n] @ h[n, D]
        acc.addmm_(dz.T, h)


def _chunks(args: KernelArgs) -> tuple[int, int]:
    if args.chunk_size is not None:
        return args.chunk_size, args.chunk_size
    return DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK


def _block(buf: Tensor, n: int, v: int) -> Tensor:
    """A contiguous [n, v] view of a flat preallocated buffer (so `out=` GEMMs never allocate)."""
    return buf[: n * v].view(n, v)


def _target_logits(hidden: Tensor, weight: Tensor, targets: Tensor, args: KernelArgs, dtype):
    """Target logit z_tgt [N] (0 where the target is not in this shard's valid rows) and found [N] (0/1)."""
    local = targets.long() - args.vocab_start
    found = (local >= 0) & (local < args.num_valid)
    rows = weight[local.clamp(0, max(args.num_valid - 1, 0))]  # [N, D]
    z_tgt = (hidden.to(dtype) * rows.to(dtype)).sum(-1) / args.temperature
    return torch.where(found, z_tgt, torch.zeros_like(z_tgt)), found.to(dtype)


def blocked_partials(hidden: Tensor, weight: Tensor, args: KernelArgs, gemms, dtype):
    """Per-token partials (m, s, t) [N] over this shard's valid rows, one block at a time."""
    num_tokens = hidden.shape[0]
    tok_chunk, voc_chunk = _chunks(args)
    m = torch.full((num_tokens,), float("-inf"), dtype=dtype, device=hidden.device)
    s = torch.zeros_like(m)
    t = torch.zeros_like(m)
    size = min(tok_chunk, num_tokens) * min(voc_chunk, max(args.num_valid, 1))
    zbuf = torch.empty(size, dtype=dtype, device=hidden.device)
    ebuf = torch.empty(size, dtype=dtype, device=hidden.device)
    inv_t = 1.0 / args.temperature
    for n0 in range(0, num_tokens, tok_chunk):
        h = hidden[n0:n0 + tok_chunk].to(dtype)
        part = (m[n0:n0 + tok_chunk], s[n0:n0 + tok_chunk], t[n0:n0 + tok_chunk])
        for v0 in range(0, args.num_valid, voc_chunk):
            w = weight[v0:min(v0 + voc_chunk, args.num_valid)].to(dtype)
            z = gemms.logits(h, w, _block(zbuf, h.shape[0], w.shape[0])).mul_(inv_t)
            cm = z.amax(1)
            z.sub_(cm[:, None])  # z - max <= 0
            e = torch.exp(z, out=_block(ebuf, h.shape[0], w.shape[0]))
            cs = e.sum(1)
            ct = torch.bmm(e[:, None, :], z[:, :, None])[:, 0, 0]  # sum e * (z - m): a batched row dot
            part = merge_partials(part, (cm, cs, ct))
        m[n0:n0 + tok_chunk], s[n0:n0 + tok_chunk], t[n0:n0 + tok_chunk] = part
    return m, s, t


class ChunkedLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, args: KernelArgs, gemms):
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # statistics never below fp32
        m, s, t = blocked_partials(hidden, weight, args, gemms, dtype)
        z_tgt, found = _target_logits(hidden, weight, targets, args, dtype)
        logp, entropy, lse = combine_partials(m, s, t, z_tgt, found, args.tp_group)
        ctx.save_for_backward(hidden, weight, targets, entropy, lse)
        ctx.args, ctx.gemms = args, gemms
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(targets)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, g_logp, g_entropy, g_lse):
        hidden, weight, targets, entropy, lse = ctx.saved_tensors
        args = ctx.args
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logp is None and g_entropy is None and g_lse is None) or not (need_h or need_w):
            return None, None, None, None, None
        grad_h, grad_w = blocked_backward(hidden, weight, targets, entropy, lse, (g_logp, g_entropy, g_lse),
                                          args, ctx.gemms, need_h, need_w)
        if grad_h is not None and args.reduce_hidden_grad:
            all_reduce_hidden_grad(grad_h, args.tp_group)
        return grad_h, grad_w, None, None, None


def _block_coefficients(grads, entropy: Tensor, inv_t: float):
    """Per-token (g_logp / T or None, -c / T, -g_H / T or None) with c = g_logp - g_lse + g_H * H."""
    g_logp, g_entropy, g_lse = grads
    c = torch.zeros_like(entropy)
    if g_logp is not None:
        c = c + g_logp
    if g_lse is not None:
        c = c - g_lse
    if g_entropy is not None:
        c = c + g_entropy * entropy
    onehot = None if g_logp is None else g_logp * inv_t
    slope = None if g_entropy is None else -g_entropy * inv_t
    return onehot, -c * inv_t, slope


def blocked_backward(hidden, weight, targets, entropy, lse, grads, args: KernelArgs, gemms, need_h, need_w):
    """Recompute each block's logits and accumulate (grad_hidden [N, D], grad_weight [V_local, D])."""
    dtype = lse.dtype
    num_tokens = hidden.shape[0]
    tok_chunk, voc_chunk = _chunks(args)
    inv_t = 1.0 / args.temperature
    onehot, offset, slope = _block_coefficients(grads, entropy, inv_t)
    grad_h = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
    size = min(tok_chunk, num_tokens) * min(voc_chunk, max(args.num_valid, 1))
    zbuf = torch.empty(size, dtype=dtype, device=hidden.device)
    pbuf = torch.empty(size, dtype=dtype, device=hidden.device)
    local = targets.long() - args.vocab_start
    for n0 in range(0, num_tokens, tok_chunk):
        sl = slice(n0, n0 + tok_chunk)
        h = hidden[sl].to(dtype)
        for v0 in range(0, args.num_valid, voc_chunk):
            w = weight[v0:min(v0 + voc_chunk, args.num_valid)].to(dtype)
            z = gemms.logits(h, w, _block(zbuf, h.shape[0], w.shape[0]))
            z.mul_(inv_t).sub_(lse[sl, None])  # log p
            dz = torch.exp(z, out=_block(pbuf, h.shape[0], w.shape[0]))  # p
            if slope is not None:  # dz = p * (offset + slope * log p)
                dz.mul_(z.mul_(slope[sl, None]).add_(offset[sl, None]))
            else:
                dz.mul_(offset[sl, None])
            if onehot is not None:
                col = local[sl] - v0
                rows = ((col >= 0) & (col < w.shape[0])).nonzero()[:, 0]
                dz.index_put_((rows, col[rows]), onehot[sl][rows], accumulate=True)
            if need_h:
                gemms.grad_hidden(dz, w, grad_h[sl])
            if need_w:
                gemms.grad_weight(dz, h, grad_w[v0:v0 + w.shape[0]])
    cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
    return cast(grad_h, hidden), cast(grad_w, weight)


def chunked_logprob_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, args: KernelArgs, gemms=None):
    """hidden [N, D], weight [V_local, D], targets [N] -> (logp, entropy, lse), each [N] (fp32 or wider)."""
    return ChunkedLogprobEntropy.apply(hidden, weight, targets, args, gemms or TorchGemms())
