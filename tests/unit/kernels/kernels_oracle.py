"""Independent float64 oracle for the kernel tests: SPEC.md section 5 re-stated with explicit per-token loops
(no log_softmax, no autograd), plus small random-case builders shared by the kernel test modules."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def loop_oracle(hidden, weight, targets, vocab_size, temperature, g_logp, g_entropy, g_lse):
    """float64 logp, entropy, lse [N] and the gradients of sum(g_logp*logp + g_entropy*H + g_lse*lse) w.r.t.
    hidden [N, D] and weight [V_padded, D] (padding rows: 0), from the textbook formulas, one token and one
    vocabulary row at a time."""
    h, w = hidden.double(), weight.double()
    n_tok, n_voc = h.shape[0], vocab_size
    logp, entropy, lse = (torch.zeros(n_tok, dtype=torch.float64) for _ in range(3))
    grad_h, grad_w = torch.zeros_like(h), torch.zeros_like(w)
    for n in range(n_tok):
        z = [float(h[n] @ w[j]) / temperature for j in range(n_voc)]
        top = max(z)
        lse_n = top + math.log(sum(math.exp(zj - top) for zj in z))
        p = [math.exp(zj - lse_n) for zj in z]
        ent = -sum(pj * (zj - lse_n) for pj, zj in zip(p, z))
        tgt = int(targets[n])
        logp[n], entropy[n], lse[n] = z[tgt] - lse_n, ent, lse_n
        for j in range(n_voc):
            d_logp = (1.0 if j == tgt else 0.0) - p[j]
            d_ent = -p[j] * ((z[j] - lse_n) + ent)
            dz = (g_logp[n] * d_logp + g_entropy[n] * d_ent + g_lse[n] * p[j]) / temperature
            grad_h[n] += dz * w[j]
            grad_w[j] += dz * h[n]
    return dict(logp=logp, entropy=entropy, lse=lse, grad_hidden=grad_h, grad_weight=grad_w)


@dataclass
class Case:
    hidden: torch.Tensor  # [N, D] float64
    weight: torch.Tensor  # [V_padded, D] float64
    targets: torch.Tensor  # [N] int64 in [0, vocab_size)
    vocab_size: int
    temperature: float
    chunk_size: int | None


def random_case(seed: int, max_tokens: int = 40, max_dim: int = 24, max_vocab: int = 60) -> Case:
    """Random shapes: padded vocabulary rows, temperature != 1, chunk sizes that divide nothing in particular."""
    g = torch.Generator().manual_seed(seed)
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    n_tok, dim, vocab = ri(1, max_tokens), ri(1, max_dim), ri(2, max_vocab)
    padded = vocab + ri(0, 5)
    scale = [0.3, 1.0, 3.0][seed % 3]  # peaked and flat distributions
    return Case(hidden=torch.randn(n_tok, dim, generator=g, dtype=torch.float64) * scale,
                weight=torch.randn(padded, dim, generator=g, dtype=torch.float64),
                targets=torch.randint(0, vocab, (n_tok,), generator=g),
                vocab_size=vocab, temperature=[1.0, 0.6, 1.7][seed % 3], chunk_size=ri(1, 17))


def assert_rel(actual, expected, tol=1e-5, what=""):
    """max |actual - expected| <= tol * max |expected| (elementwise relative error is meaningless near 0)."""
    err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    assert err <= tol * max(scale, 1e-12), f"{what}: max abs error {err:.3e} > {tol} * max |expected| {scale:.3e}"


def run_op(fn, case: Case, dtype, grads, **kw):
    """Run `fn` (token_logprob_entropy) on `case` cast to dtype; backward of sum(g * out) for the given
    upstream gradients (g_logp, g_entropy, g_lse), any of which may be None (that output unused)."""
    h = case.hidden.to(dtype).clone().requires_grad_()
    w = case.weight.to(dtype).clone().requires_grad_()
    out = fn(h, w, case.targets, vocab_size=case.vocab_size, temperature=case.temperature, **kw)
    loss = sum((g * o).sum() for g, o in zip(grads, (out.logp, out.entropy, out.lse)) if g is not None)
    loss.backward()
    return out, h.grad, w.grad
