"""Pure-torch blocked backend (the CPU default): loops over [vocabulary, token] blocks; backward recomputes each
block's logits. The math lives in function.py and vocab_parallel.py; the block GEMMs in cpu_gemm.py.

Cost: 4 GEMMs of N x V x D (forward logits; backward: recomputed logits, grad_hidden, grad_weight) against the
naive path's 3, paid for by never touching an [N, V] array. The forward keeps only per-token statistics
(lse, entropy), so the backward recomputes each block once. The entropy adds elementwise work, never a GEMM.
What keeps the rest cheap:
- the GEMMs run on oneDNN for float32 on x86 (cpu_gemm.py: about 2x MKL's float32 speed on the AMD box);
- every elementwise pass runs on one cache-sized block, in place or into preallocated buffers (`out=` ops);
  1/T rides in the hidden operand (h / T computed once), the -lse shift is one in-place add per block;
- vocabulary blocks are the outer loop: a weight block (and its weight-gradient rows) stays in cache while the
  token blocks stream past, and the hidden states (N x D, smaller than V x D) are what gets re-read;
- per-block softmax statistics go into small [blocks, N] tables merged once at the end, and the target (one-hot)
  terms of the gradient are applied once outside the loop (a gather and an index_add), not per block;
- with accumulate_into_main_grad the weight-gradient GEMMs accumulate straight into `weight.main_grad` rows.
"""
from __future__ import annotations

import torch
from torch import Tensor

from megahybrid.kernels import cpu_gemm as gemm
from megahybrid.kernels.function import Coefficients, apply
from megahybrid.kernels.inputs import KernelArgs
from megahybrid.kernels.vocab_parallel import rescale

# Tokens x vocabulary rows per block (fp32: 4 MiB per block, an L3-sized working set with the 8 MiB weight block).
# Measured on the benchmark CPU (oneDNN GEMMs, fwd+bwd CPU time, benchmarks/README.md): 512 x 2048 was the
# fastest of 512-4096 x 512-2048 at both benchmark shapes, by 2-5% over 1024 x 512 (about the noise of the
# shared machine): wider vocabulary blocks amortise oneDNN's per-call packing of the other operand.
DEFAULT_TOKEN_CHUNK = 512
DEFAULT_VOCAB_CHUNK = 2048
PREPACK = True  # pack a GEMM operand once where it serves several blocks (cpu_gemm.pack)


def _block(buf: Tensor | None, n: int, v: int) -> Tensor | None:
    """A contiguous [n, v] view of a flat preallocated buffer (so `out=` ops never allocate); None stays None."""
    return None if buf is None else buf[: n * v].view(n, v)


def _gemm_buffer(like: Tensor, size: int) -> Tensor | None:
    """The block buffer GEMMs write into: none on the oneDNN path (it returns fresh blocks)."""
    return None if gemm.uses_onednn(like) else torch.empty(size, dtype=like.dtype, device=like.device)


def _store(dst: Tensor, src: Tensor) -> None:
    """dst = src unless src already is dst (the torch GEMM path wrote in place)."""
    if src.data_ptr() != dst.data_ptr():
        dst.copy_(src)


def _scaled_hidden(hidden: Tensor, dtype, temperature: float) -> Tensor:
    """hidden / T in `dtype` (no copy for T = 1 and fp32/fp64 inputs): 1/T rides in the GEMM's operand."""
    hidden = hidden.to(dtype)
    return hidden if temperature == 1.0 else hidden * (1.0 / temperature)


def _packed(w: Tensor, blocks) -> Tensor:
    """`w` prepacked for the GEMMs of `blocks` (ranges of the other operand's rows) when it serves several."""
    return gemm.pack(w, blocks[0][1] - blocks[0][0]) if PREPACK and len(blocks) > 1 else w


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
        hs = _scaled_hidden(hidden, dtype, args.temperature)  # h / T: z = (h / T) . w
        zbuf, ebuf = _gemm_buffer(hs, size), torch.empty(size, dtype=dtype, device=hidden.device)
        for b, (v0, v1) in enumerate(vocab):
            w = _packed(weight[v0:v1].to(dtype), tokens)
            for n0, n1 in tokens:
                z = gemm.linear(hs[n0:n1], w, out=_block(zbuf, n1 - n0, v1 - v0))
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
        """
        dtype = coef.lse.dtype
        num_tokens = hidden.shape[0]
        tokens, vocab, size = self._blocks(args, num_tokens)
        # grad_h is accumulated over vocabulary blocks (zero-filled once: [N, D] is small); a grad_w row block
        # is written by its first token block and accumulated by the others (no [V, D] zero fill)
        grad_h = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        grad_w = torch.empty(weight.shape, dtype=dtype, device=weight.device) if need_w and main_grad is None \
            else None
        if grad_w is not None:
            grad_w[args.num_valid:].zero_()  # padding rows
            if not tokens:
                grad_w.zero_()
        wgrad = main_grad if main_grad is not None else grad_w
        neg_lse = -coef.lse[:, None]
        hid = hidden.to(dtype)
        hs = _scaled_hidden(hid, dtype, args.temperature)
        zbuf, pbuf = _gemm_buffer(hs, size), torch.empty(size, dtype=dtype, device=hidden.device)
        # the hidden blocks as grad_weight's GEMM operand, packed once for all vocabulary blocks
        hid_t = [_packed(hid[n0:n1].T, vocab) for n0, n1 in tokens] if wgrad is not None else None
        for v0, v1 in vocab:
            w = weight[v0:v1].to(dtype)
            w_z, w_h = _packed(w, tokens), (_packed(w.T, tokens) if grad_h is not None else None)
            for i, (n0, n1) in enumerate(tokens):
                shape = (n1 - n0, v1 - v0)
                z = gemm.linear_shift(hs[n0:n1], w_z, neg_lse[n0:n1], out=_block(zbuf, *shape))  # log p
                dz = torch.exp(z, out=_block(pbuf, *shape))  # p
                if coef.slope is not None:  # dz = p * (offset + slope * log p)
                    dz.mul_(torch.addcmul(coef.offset[n0:n1, None], z, coef.slope[n0:n1, None], out=z))
                else:
                    dz.mul_(coef.offset[n0:n1, None])
                if grad_h is not None:
                    gemm.addmm_(grad_h[n0:n1], dz, w_h)
                if wgrad is not None:  # a plain grad_w row block: written by the first token block
                    if main_grad is None and n0 == 0:
                        _store(wgrad[v0:v1], gemm.linear(dz.T, hid_t[i], out=wgrad[v0:v1]))
                    else:
                        gemm.addmm_(wgrad[v0:v1], dz.T, hid_t[i])
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
