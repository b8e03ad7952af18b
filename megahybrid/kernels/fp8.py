"""Transformer Engine FP8 backend (Hopper / Ada GPUs): the LM-head GEMMs in FP8, selected with impl="te_fp8".

Tokens go in chunks. A chunk's logits [n, V_local] come from a `transformer_engine.pytorch.Linear` (no bias)
whose weight parameter shares storage with this rank's LM-head shard, run under TE's autocast with the
`Float8CurrentScaling` recipe: per-tensor scales are computed from each GEMM's own operands, so there is no amax
history to keep and one module per (shape, dtype, device), re-pointed at the current weight before each use, is
exact to the recipe (building a te.Linear allocates and initialises a [V_local, D] weight: per call, that was
about 0.5 GB of allocation and a random init at the 7B head, twice per micro-batch). Backward recomputes each
chunk's logits through the same module and back-propagates the closed-form logit gradient (function.py) through it, so dgrad and wgrad are
TE's FP8 GEMMs too (E5M2 gradients under the HYBRID format). The reductions (max, exp, sums) stay in fp32.

FP8 operands make logits accurate to about 1e-2 relative, not the 1e-5 of the fp32 implementations: use it where
that trade is wanted (large-vocabulary RL on H100s). On a machine without CUDA or without Transformer Engine the
op raises a RuntimeError naming what is missing. Transformer Engine is imported only when this path runs.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from megahybrid.kernels.function import Coefficients, apply
from megahybrid.kernels.inputs import KernelArgs
from megahybrid.kernels.vocab_parallel import merge_partials

# Logit elements per token chunk (fp32 copy 128 MiB); FP8 GEMMs need dimensions divisible by 16.
CHUNK_ELEMENTS = 1 << 25
FP8_ALIGN = 16


def _load_te(hidden: Tensor):
    """(transformer_engine.pytorch, transformer_engine.common.recipe), or a RuntimeError naming what is missing."""
    missing = []
    if hidden.device.type != "cuda":
        missing.append(f"CUDA tensors on an FP8-capable GPU (got {hidden.device} tensors; "
                       f"torch.cuda.is_available() = {torch.cuda.is_available()})")
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common import recipe
    except ImportError as err:
        missing.append(f"NVIDIA Transformer Engine (pip install 'transformer-engine[pytorch]', the `gpu` extra): {err}")
    if missing:
        raise RuntimeError("token_logprob_entropy(impl='te_fp8') needs " + "; and ".join(missing))
    if not hasattr(recipe, "Float8CurrentScaling"):
        raise RuntimeError("token_logprob_entropy(impl='te_fp8') needs Transformer Engine >= 2.2 "
                           "(transformer_engine.common.recipe.Float8CurrentScaling)")
    ok, reason = _fp8_available(te)
    if not ok:
        raise RuntimeError(f"token_logprob_entropy(impl='te_fp8'): FP8 is not available on this GPU: {reason}")
    return te, recipe


def _fp8_available(te) -> tuple[bool, str]:
    check = getattr(te, "is_fp8_available", None)  # newer TE
    if check is not None:
        try:
            return check(return_reason=True)
        except TypeError:
            return bool(check()), "unsupported GPU"
    from transformer_engine.pytorch.fp8 import check_fp8_support  # TE 1.x - 2.x

    return check_fp8_support()


def _autocast(te, recipe):
    fp8_recipe = recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID)
    if hasattr(te, "autocast"):  # TE >= 2.8 renamed fp8_autocast
        return te.autocast(enabled=True, recipe=fp8_recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe)


@functools.lru_cache(maxsize=8)
def _te_linear(te, dim: int, rows: int, dtype: torch.dtype, device: torch.device):
    """The te.Linear [rows, dim] for this shape (its own initial weight is replaced before every use)."""
    return te.Linear(dim, rows, bias=False, params_dtype=dtype, device=device)


class TEFp8Backend:
    def __init__(self, hidden: Tensor, weight: Tensor, args: KernelArgs):
        self.te, self.recipe = _load_te(hidden)
        dim, rows = hidden.shape[1], weight.shape[0]
        if dim % FP8_ALIGN or rows % FP8_ALIGN:
            raise ValueError(f"token_logprob_entropy(impl='te_fp8'): FP8 GEMMs need the hidden size ({dim}) and the "
                             f"local vocabulary rows ({rows}) divisible by {FP8_ALIGN}; pad the vocabulary "
                             "(Megatron's make_vocab_size_divisible_by) or use impl='chunked'")
        self.head = _te_linear(self.te, dim, rows, weight.dtype, weight.device)
        self.weight = torch.nn.Parameter(weight.detach(), requires_grad=True)  # shares storage: no copy
        per_chunk = args.chunk_size or max(FP8_ALIGN, CHUNK_ELEMENTS // max(rows, 1))
        self.tok_chunk = -(-per_chunk // FP8_ALIGN) * FP8_ALIGN

    def _logits(self, h: Tensor) -> Tensor:
        """[n, D] -> [n, V_local] through the FP8 GEMM (rows padded with zeros to a multiple of 16)."""
        pad = -h.shape[0] % FP8_ALIGN
        if pad:
            h = torch.cat([h, h.new_zeros(pad, h.shape[1])])
        self.head.weight = self.weight  # the shared module may have served another head since (e.g. the reference)
        with _autocast(self.te, self.recipe):
            return self.head(h)

    def partials(self, hidden: Tensor, weight: Tensor, args: KernelArgs, dtype):
        num_tokens = hidden.shape[0]
        m = torch.full((num_tokens,), float("-inf"), dtype=dtype, device=hidden.device)
        s, t = torch.zeros_like(m), torch.zeros_like(m)
        if args.num_valid == 0:
            return m, s, t
        with torch.no_grad():
            for n0 in range(0, num_tokens, self.tok_chunk):
                sl = slice(n0, n0 + self.tok_chunk)
                n = hidden[sl].shape[0]
                z = self._logits(hidden[sl])[:n, : args.num_valid].to(dtype) / args.temperature
                cm = z.amax(1)
                z.sub_(cm[:, None])
                e = torch.exp(z)
                m[sl], s[sl], t[sl] = merge_partials((m[sl], s[sl], t[sl]), (cm, e.sum(1), (e * z).sum(1)))
        return m, s, t

    def grads(self, hidden: Tensor, weight: Tensor, coef: Coefficients, args: KernelArgs, need_h, need_w,
              main_grad=None):
        dtype = coef.lse.dtype
        grad_h = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w and main_grad is None \
            else None
        inputs_of = lambda h: [x for x, need in ((h, need_h), (self.weight, need_w)) if need]  # noqa: E731
        for n0 in range(0, hidden.shape[0], self.tok_chunk):
            sl = slice(n0, n0 + self.tok_chunk)
            h = hidden[sl].detach().requires_grad_(need_h)
            n = h.shape[0]
            with torch.enable_grad():
                out = self._logits(h)  # recomputed; padded rows beyond n
            dz = torch.zeros(out.shape, dtype=dtype, device=out.device)
            logp = out[:n, : args.num_valid].detach().to(dtype) / args.temperature - coef.lse[sl, None]
            p = torch.exp(logp)
            if coef.slope is not None:
                dz[:n, : args.num_valid] = p * (coef.offset[sl, None] + coef.slope[sl, None] * logp)
            else:
                dz[:n, : args.num_valid] = p * coef.offset[sl, None]
            if coef.onehot is not None:
                local = coef.local_targets[sl]
                rows = ((local >= 0) & (local < args.num_valid)).nonzero()[:, 0]
                dz.index_put_((rows, local[rows]), coef.onehot[sl][rows], accumulate=True)
            grads = iter(torch.autograd.grad(out, inputs_of(h), grad_outputs=dz.to(out.dtype)))
            if need_h:
                grad_h[sl] = next(grads)[:n].to(dtype)
            if main_grad is not None:
                main_grad.add_(next(grads))  # per chunk: no [V_local, D] gradient of our own
            elif need_w:
                grad_w += next(grads).to(dtype)
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype))


def fp8_logprob_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, args: KernelArgs):
    """hidden [N, D], weight [V_local, D], targets [N] -> (logp, entropy, lse), each [N] fp32; GEMMs in FP8."""
    return apply(hidden, weight, targets, args, TEFp8Backend(hidden, weight, args))


__all__ = ["fp8_logprob_entropy", "TEFp8Backend"]
