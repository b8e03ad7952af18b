"""Pure-torch blocked backend (the CPU default): loops over [vocabulary, token] blocks with preallocated
buffers; backward recomputes each block's logits. The math lives in function.py and vocab_parallel.py.

Cost: 4 GEMMs of N x V x D (forward logits; backward: recomputed logits, grad_hidden, grad_weight) against the
naive path's 3, paid for by never touching an [N, V] array. What keeps the rest cheap:
- every elementwise pass runs on one cache-sized block, in place in two preallocated buffers (`out=` ops);
  1/T and the -lse shift ride along inside the GEMMs (alpha / beta of addmm);
- vocabulary blocks are the outer loop: a weight block (and its weight-gradient rows) stays in cache while the
  token blocks stream past, and the hidden states (N x D, smaller than V x D) are what gets re-read;
- per-block softmax statistics go into small [blocks, N] tables merged once at the end, and the target (one-hot)
  terms of the gradient are applied once outside the loop (a gather and an index_add), not per block;
- with accumulate_into_main_grad the weight-gradient GEMMs accumulate straight into `weight.main_grad` rows.
"""
from __future__ import annotations

import torch
from torch import Tensor

from megahybrid.kernels.function import Coefficients, apply
from megahybrid.kernels.fused_wgrad import add_into
from megahybrid.kernels.inputs import KernelArgs
from megahybrid.kernels.vocab_parallel import rescale

# Tokens x vocabulary rows per block (fp32: 2 MiB per block buffer, two buffers). Measured on the benchmark CPU
# (benchmarks/README.md): block GEMMs of this size run at 85-95 GFLOP/s (one big N x V GEMM: ~75), and 1024 x 512
# was the fastest of 256-1024 x 512-2048 at both benchmark shapes by a few percent (about the noise of the shared
# machine); the elementwise passes (about 5% of the time) then work on an L3-sized block.
DEFAULT_TOKEN_CHUNK = 1024
DEFAULT_VOCAB_CHUNK = 512


def _block(buf: Tensor, n: int, v: int) -> Tensor:
    """A contiguous [n, v] view of a flat preallocated buffer (so `out=` ops never allocate)."""
    return buf[: n * v].view(n, v)


def _ranges(total: int, step: int):
    return [(start, min(start + step, total)) for start in range(0, total, step)]


class ChunkedBackend:
    @staticmethod
    def _blocks(args: KernelArgs, num_tokens: int):
        tok = args.chunk_size or DEFAULT_TOKEN_CHUNK
        voc = args.chunk_size or DEFAULT_VOCAB_CHUNK
        size = min(tok, num_tokens) * min(voc, max(args.num_valid, 1))
        return _ranges(num_tokens, tok), _ranges(args.num_valid, voc), size

    def partials(self, hidden: Tensor, weight: Tensor, args: KernelArgs, dtype):
        """Per-token partials (m, s, t) [N] over this shard's valid rows (see vocab_parallel.py)."""
        num_tokens = hidden.shape[0]
        tokens, vocab, size = self._blocks(args, num_tokens)
        if not vocab or not tokens:
            m = torch.full((num_tokens,), float("-inf"), dtype=dtype, device=hidden.device)
            return m, torch.zeros_like(m), torch.zeros_like(m)
        # Per-block (max, sum exp, sum exp * (z - max)) of every token, merged across blocks at the end.
        cm, cs, ct = (torch.empty(len(vocab), num_tokens, dtype=dtype, device=hidden.device) for _ in range(3))
        zbuf, ebuf = (torch.empty(size, dtype=dtype, device=hidden.device) for _ in range(2))
        inv_t = 1.0 / args.temperature
        hidden = hidden.to(dtype)  # once, not once per block (a no-op for fp32 / fp64 inputs)
        for b, (v0, v1) in enumerate(vocab):
            w = weight[v0:v1].to(dtype)
            for n0, n1 in tokens:
                z = _block(zbuf, n1 - n0, v1 - v0).addmm_(hidden[n0:n1], w.T, beta=0.0, alpha=inv_t)
                top = torch.amax(z, 1, out=cm[b, n0:n1])
                e = torch.exp(z.sub_(top[:, None]), out=_block(ebuf, n1 - n0, v1 - v0))  # z - max <= 0
                torch.sum(e, 1, out=cs[b, n0:n1])
                ct[b, n0:n1] = torch.linalg.vecdot(e, z)  # row dots e . (z - max): one fused pass, unlike bmm
        m = cm.amax(0)
        s, t = rescale(cm, cs, ct, m)  # every block's (s, t) relative to the common max m
        return m, s.sum(0), t.sum(0)

    def grads(self, hidden: Tensor, weight: Tensor, coef: Coefficients, args: KernelArgs, need_h, need_w,
              main_grad=None):
        """Recompute each block's logits; grad_hidden [N, D] and grad_weight [V_local, D] (or += into main_grad).
        The first block of each output row range is written with beta=0, so nothing is zero-filled twice."""
        dtype = coef.lse.dtype
        num_tokens = hidden.shape[0]
        tokens, vocab, size = self._blocks(args, num_tokens)
        inv_t = 1.0 / args.temperature
        grad_h = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        grad_w = torch.empty(weight.shape, dtype=dtype, device=weight.device) if need_w and main_grad is None \
            else None
        if grad_h is not None and not vocab:
            grad_h.zero_()
        if grad_w is not None:
            grad_w[args.num_valid:].zero_()  # padding rows
            if not tokens:
                grad_w.zero_()
        zbuf, pbuf = (torch.empty(size, dtype=dtype, device=hidden.device) for _ in range(2))
        neg_lse = -coef.lse
        hid = hidden.to(dtype)
        for v0, v1 in vocab:
            w = weight[v0:v1].to(dtype)
            for n0, n1 in tokens:
                h = hid[n0:n1]
                z = torch.addmm(neg_lse[n0:n1, None], h, w.T, alpha=inv_t, out=_block(zbuf, n1 - n0, v1 - v0))
                dz = torch.exp(z, out=_block(pbuf, n1 - n0, v1 - v0))  # p, with z = log p
                if coef.slope is not None:  # dz = p * (offset + slope * log p)
                    dz.mul_(torch.addcmul(coef.offset[n0:n1, None], z, coef.slope[n0:n1, None], out=z))
                else:
                    dz.mul_(coef.offset[n0:n1, None])
                if grad_h is not None:
                    grad_h[n0:n1].addmm_(dz, w, beta=0.0 if v0 == 0 else 1.0)
                if main_grad is not None:
                    add_into(main_grad[v0:v1], dz.T, h)
                elif grad_w is not None:
                    grad_w[v0:v1].addmm_(dz.T, h, beta=0.0 if n0 == 0 else 1.0)
        self._add_target_terms(hid, weight, coef, args, tokens, grad_h,
                               main_grad if main_grad is not None else grad_w)
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype))

    @staticmethod
    def _add_target_terms(hidden, weight, coef: Coefficients, args: KernelArgs, tokens, grad_h, grad_w) -> None:
        """The one-hot part of dz (g_logp / T at each token's target logit), outside the block loop:
        grad_h[n] += c_n * W[target_n] and grad_w[target_n] += c_n * h[n], over tokens whose target is here
        (one token block at a time, so the gathered rows stay block-sized)."""
        if coef.onehot is None:
            return
        for n0, n1 in tokens:
            local = coef.local_targets[n0:n1]
            rows = ((local >= 0) & (local < args.num_valid)).nonzero()[:, 0]
            c = coef.onehot[n0:n1][rows, None]
            if grad_h is not None:
                grad_h.index_add_(0, rows + n0, (weight[local[rows]] * c).to(grad_h.dtype))
            if grad_w is not None:
                grad_w.index_add_(0, local[rows], (hidden[n0:n1][rows] * c).to(grad_w.dtype))


def chunked_logprob_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, args: KernelArgs):
    """hidden [N, D], weight [V_local, D], targets [N] -> (logp, entropy, lse), each [N] (fp32 or wider)."""
    return apply(hidden, weight, targets, args, ChunkedBackend())
