"""Pure-torch blocked backend (the CPU default): loops over [token, vocabulary] blocks with preallocated
buffers; backward recomputes each block's logits. The math lives in function.py and vocab_parallel.py.

Cost: 4 GEMMs of N x V x D (forward logits; backward: recomputed logits, grad_hidden, grad_weight) against the
naive path's 3, paid for by never touching an [N, V] array: every elementwise pass runs on a cache-sized block,
and 1/T and the -lse shift ride along inside the GEMMs (alpha / beta of addmm).
"""
from __future__ import annotations

import torch
from torch import Tensor

from megahybrid.kernels.function import Coefficients, apply
from megahybrid.kernels.inputs import KernelArgs
from megahybrid.kernels.vocab_parallel import merge_partials

# Tokens and vocabulary rows per block: 512 x 2048 fp32 = 4 MiB per block buffer (two buffers). Block GEMMs at
# D ~ 1k run as fast as one big GEMM (measured: benchmarks/logprob_entropy.py), so blocks only need to be large
# enough to amortise the per-block Python overhead.
DEFAULT_TOKEN_CHUNK = 512
DEFAULT_VOCAB_CHUNK = 2048


def _block(buf: Tensor, n: int, v: int) -> Tensor:
    """A contiguous [n, v] view of a flat preallocated buffer (so `out=` ops never allocate)."""
    return buf[: n * v].view(n, v)


class ChunkedBackend:
    @staticmethod
    def _blocks(args: KernelArgs, num_tokens: int):
        tok = args.chunk_size or DEFAULT_TOKEN_CHUNK
        voc = args.chunk_size or DEFAULT_VOCAB_CHUNK
        return tok, voc, min(tok, num_tokens) * min(voc, max(args.num_valid, 1))

    def partials(self, hidden: Tensor, weight: Tensor, args: KernelArgs, dtype):
        """Per-token partials (m, s, t) [N] over this shard's valid rows, one block at a time."""
        num_tokens = hidden.shape[0]
        tok_chunk, voc_chunk, size = self._blocks(args, num_tokens)
        m = torch.full((num_tokens,), float("-inf"), dtype=dtype, device=hidden.device)
        s, t = torch.zeros_like(m), torch.zeros_like(m)
        zbuf, ebuf = (torch.empty(size, dtype=dtype, device=hidden.device) for _ in range(2))
        inv_t = 1.0 / args.temperature
        for n0 in range(0, num_tokens, tok_chunk):
            sl = slice(n0, n0 + tok_chunk)
            h = hidden[sl].to(dtype)
            part = (m[sl], s[sl], t[sl])
            for v0 in range(0, args.num_valid, voc_chunk):
                w = weight[v0:min(v0 + voc_chunk, args.num_valid)].to(dtype)
                z = _block(zbuf, h.shape[0], w.shape[0]).addmm_(h, w.T, beta=0.0, alpha=inv_t)  # logits / T
                cm = z.amax(1)
                z.sub_(cm[:, None])  # z - max <= 0
                e = torch.exp(z, out=_block(ebuf, h.shape[0], w.shape[0]))
                ct = torch.bmm(e[:, None, :], z[:, :, None])[:, 0, 0]  # sum e * (z - m): a batched row dot
                part = merge_partials(part, (cm, e.sum(1), ct))
            m[sl], s[sl], t[sl] = part
        return m, s, t

    def grads(self, hidden: Tensor, weight: Tensor, coef: Coefficients, args: KernelArgs, need_h, need_w):
        """Recompute each block's logits; accumulate (grad_hidden [N, D], grad_weight [V_local, D]).
        The first block of each output row range is written with beta=0, so nothing is zero-filled twice."""
        dtype = coef.lse.dtype
        num_tokens = hidden.shape[0]
        tok_chunk, voc_chunk, size = self._blocks(args, num_tokens)
        inv_t = 1.0 / args.temperature
        grad_h = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        grad_w = torch.empty(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        if need_h and args.num_valid == 0:
            grad_h.zero_()
        if need_w:
            grad_w[args.num_valid:].zero_()  # padding rows
            if num_tokens == 0:
                grad_w.zero_()
        zbuf, pbuf = (torch.empty(size, dtype=dtype, device=hidden.device) for _ in range(2))
        neg_lse = -coef.lse
        for n0 in range(0, num_tokens, tok_chunk):
            sl = slice(n0, n0 + tok_chunk)
            h = hidden[sl].to(dtype)
            for v0 in range(0, args.num_valid, voc_chunk):
                w = weight[v0:min(v0 + voc_chunk, args.num_valid)].to(dtype)
                z = _block(zbuf, h.shape[0], w.shape[0])
                z.copy_(neg_lse[sl, None].expand_as(z)).addmm_(h, w.T, alpha=inv_t)  # log p = z / T - lse
                dz = torch.exp(z, out=_block(pbuf, h.shape[0], w.shape[0]))  # p
                if coef.slope is not None:  # dz = p * (offset + slope * log p)
                    dz.mul_(torch.addcmul(coef.offset[sl, None], z, coef.slope[sl, None], out=z))
                else:
                    dz.mul_(coef.offset[sl, None])
                if coef.onehot is not None:
                    col = coef.local_targets[sl] - v0
                    rows = ((col >= 0) & (col < w.shape[0])).nonzero()[:, 0]
                    dz.index_put_((rows, col[rows]), coef.onehot[sl][rows], accumulate=True)
                if need_h:
                    grad_h[sl].addmm_(dz, w, beta=0.0 if v0 == 0 else 1.0)
                if need_w:
                    grad_w[v0:v0 + w.shape[0]].addmm_(dz.T, h, beta=0.0 if n0 == 0 else 1.0)
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype))


def chunked_logprob_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, args: KernelArgs):
    """hidden [N, D], weight [V_local, D], targets [N] -> (logp, entropy, lse), each [N] (fp32 or wider)."""
    return apply(hidden, weight, targets, args, ChunkedBackend())
