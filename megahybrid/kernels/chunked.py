"""Pure-torch blocked backend (the CPU default): loops over [token, vocabulary] blocks with preallocated
buffers; backward recomputes each block's logits. The math lives in function.py and vocab_parallel.py."""
from __future__ import annotations

import torch
from torch import Tensor

from megahybrid.kernels.function import Coefficients, apply
from megahybrid.kernels.inputs import KernelArgs
from megahybrid.kernels.vocab_parallel import merge_partials

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


def _block(buf: Tensor, n: int, v: int) -> Tensor:
    """A contiguous [n, v] view of a flat preallocated buffer (so `out=` ops never allocate)."""
    return buf[: n * v].view(n, v)


class ChunkedBackend:
    def __init__(self, gemms=None):
        self.gemms = gemms or TorchGemms()

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
                z = self.gemms.logits(h, w, _block(zbuf, h.shape[0], w.shape[0])).mul_(inv_t)
                cm = z.amax(1)
                z.sub_(cm[:, None])  # z - max <= 0
                e = torch.exp(z, out=_block(ebuf, h.shape[0], w.shape[0]))
                ct = torch.bmm(e[:, None, :], z[:, :, None])[:, 0, 0]  # sum e * (z - m): a batched row dot
                part = merge_partials(part, (cm, e.sum(1), ct))
            m[sl], s[sl], t[sl] = part
        return m, s, t

    def grads(self, hidden: Tensor, weight: Tensor, coef: Coefficients, args: KernelArgs, need_h, need_w):
        """Recompute each block's logits; accumulate (grad_hidden [N, D], grad_weight [V_local, D])."""
        dtype = coef.lse.dtype
        num_tokens = hidden.shape[0]
        tok_chunk, voc_chunk, size = self._blocks(args, num_tokens)
        inv_t = 1.0 / args.temperature
        grad_h = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        zbuf, pbuf = (torch.empty(size, dtype=dtype, device=hidden.device) for _ in range(2))
        for n0 in range(0, num_tokens, tok_chunk):
            sl = slice(n0, n0 + tok_chunk)
            h = hidden[sl].to(dtype)
            for v0 in range(0, args.num_valid, voc_chunk):
                w = weight[v0:min(v0 + voc_chunk, args.num_valid)].to(dtype)
                z = self.gemms.logits(h, w, _block(zbuf, h.shape[0], w.shape[0]))
                z.mul_(inv_t).sub_(coef.lse[sl, None])  # log p
                dz = torch.exp(z, out=_block(pbuf, h.shape[0], w.shape[0]))  # p
                if coef.slope is not None:  # dz = p * (offset + slope * log p)
                    dz.mul_(z.mul_(coef.slope[sl, None]).add_(coef.offset[sl, None]))
                else:
                    dz.mul_(coef.offset[sl, None])
                if coef.onehot is not None:
                    col = coef.local_targets[sl] - v0
                    rows = ((col >= 0) & (col < w.shape[0])).nonzero()[:, 0]
                    dz.index_put_((rows, col[rows]), coef.onehot[sl][rows], accumulate=True)
                if need_h:
                    self.gemms.grad_hidden(dz, w, grad_h[sl])
                if need_w:
                    self.gemms.grad_weight(dz, h, grad_w[v0:v0 + w.shape[0]])
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype))


def chunked_logprob_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, args: KernelArgs):
    """hidden [N, D], weight [V_local, D], targets [N] -> (logp, entropy, lse), each [N] (fp32 or wider)."""
    return apply(hidden, weight, targets, args, ChunkedBackend())
