"""Triton kernels of the fused LM-head log-prob + entropy (imported only by triton_logprob_entropy.py).

Forward: one program per block of BLOCK_N tokens streams this shard's valid vocabulary rows in BLOCK_V tiles,
computing logits tiles with tl.dot over BLOCK_D slices of the hidden size and keeping the online partials
(m, s, t) of vocab_parallel.py in registers. Backward: one program per [BLOCK_N, BLOCK_V] tile recomputes the
logits tile, forms dz (function.py) and accumulates dz @ W into grad_hidden and dz^T @ H into grad_weight with
fp32 atomic adds. Dots run in fp32 (`input_precision="ieee"` for fp32 inputs: TF32 would break the 1e-5 contract;
the interpreter's bf16 dots are wrong, so operands are cast to fp32 there too).

The interpreter (TRITON_INTERPRET=1) must be set before this module is imported (triton.jit reads it then).
"""
import triton
import triton.language as tl


@triton.jit
def _logits_tile(H, W, rn, rv, N, NV, D, stride_hn, stride_wv, inv_t,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """z[BLOCK_N, BLOCK_V] = H[rn] @ W[rv]^T * inv_t, fp32 accumulation (rows past N / NV read as 0)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        h = tl.load(H + rn[:, None] * stride_hn + rd[None, :], mask=(rn[:, None] < N) & (rd[None, :] < D), other=0.0)
        w = tl.load(W + rv[:, None] * stride_wv + rd[None, :], mask=(rv[:, None] < NV) & (rd[None, :] < D),
                    other=0.0)
        acc += tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision=PRECISION)
    return acc * inv_t


@triton.jit
def partials_kernel(H, W, M, S, T, N, NV, D, stride_hn, stride_wv, inv_t,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Per token: m = max z, s = sum exp(z - m), t = sum exp(z - m) (z - m) over the valid rows [0, NV)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, NV, BLOCK_V):
        rv = v0 + tl.arange(0, BLOCK_V)
        valid = rv[None, :] < NV
        z = _logits_tile(H, W, rn, rv, N, NV, D, stride_hn, stride_wv, inv_t, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
        z = tl.where(valid, z, float("-inf"))
        new_m = tl.maximum(m, tl.max(z, 1))
        shifted = tl.where(valid, z - new_m[:, None], 0.0)
        e = tl.where(valid, tl.exp(shifted), 0.0)
        shift = m - new_m  # -inf on the first tile, where s = t = 0
        scale = tl.exp(shift)
        t = scale * (t + tl.where(s > 0, shift, 0.0) * s) + tl.sum(e * shifted, 1)
        s = scale * s + tl.sum(e, 1)
        m = new_m
    keep = rn < N
    tl.store(M + rn, m, mask=keep)
    tl.store(S + rn, s, mask=keep)
    tl.store(T + rn, t, mask=keep)


@triton.jit
def grads_kernel(H, W, LSE, OFFSET, SLOPE, ONEHOT, TGT, GH, GW, N, NV, D, stride_hn, stride_wv, inv_t,
                 NEED_H: tl.constexpr, NEED_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One [BLOCK_N, BLOCK_V] tile: dz = p (offset + slope log p) + onehot; GH += dz W, GW += dz^T H (atomics).
    SLOPE / ONEHOT are zero vectors when that output is unused; TGT = target id - vocab_start."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rv = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    tok = rn < N
    valid = (rv[None, :] < NV) & tok[:, None]
    z = _logits_tile(H, W, rn, rv, N, NV, D, stride_hn, stride_wv, inv_t, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
    logp = z - tl.load(LSE + rn, mask=tok, other=0.0)[:, None]
    p = tl.exp(logp)
    offset = tl.load(OFFSET + rn, mask=tok, other=0.0)
    slope = tl.load(SLOPE + rn, mask=tok, other=0.0)
    onehot = tl.load(ONEHOT + rn, mask=tok, other=0.0)
    tgt = tl.load(TGT + rn, mask=tok, other=-1)
    dz = p * (offset[:, None] + slope[:, None] * logp)
    dz += tl.where(rv[None, :] == tgt[:, None], onehot[:, None], 0.0)
    dz = tl.where(valid, dz, 0.0)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        dmask = rd[None, :] < D
        if NEED_H:
            w = tl.load(W + rv[:, None] * stride_wv + rd[None, :], mask=(rv[:, None] < NV) & dmask, other=0.0)
            gh = tl.dot(dz, w.to(tl.float32), input_precision=PRECISION)
            tl.atomic_add(GH + rn[:, None] * D + rd[None, :], gh, mask=tok[:, None] & dmask)
        if NEED_W:
            h = tl.load(H + rn[:, None] * stride_hn + rd[None, :], mask=tok[:, None] & dmask, other=0.0)
            gw = tl.dot(tl.trans(dz), h.to(tl.float32), input_precision=PRECISION)
            tl.atomic_add(GW + rv[:, None] * D + rd[None, :], gw, mask=(rv[:, None] < NV) & dmask)
