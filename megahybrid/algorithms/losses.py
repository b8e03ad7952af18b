"""Per-token surrogates, KL estimators and globally normalised aggregation (SPEC.md sections 1 and 3).

Every function here is pure tensor math on `[S, T]` tensors aligned with `Batch.tokens` (position t holds the
quantity of token t given tokens[:t]). Masks are bool `[S, T]`; only masked-in positions ever count, and values at
masked-out positions never reach the loss or its gradient (they may be garbage, e.g. padding log-probs).

Global normalisation (DESIGN.md rule 2): `aggregate` divides the micro-batch's numerator by a *global* denominator
(tokens or sequences of the whole step over all micro-batches and data-parallel ranks) that `group_counts` produced
per rank and the caller all-reduced. Summing the shares of every micro-batch on every rank gives the SPEC loss.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

AggMode = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
AGG_MODES: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
SFT_WEIGHTS: tuple[str, ...] = ("none", "dft", "phi")
L_MAX = "max/l_max"
"""Statistic holding L_max of `seq_mean_token_sum_norm` (rollout.max_new_tokens). Keys starting with `max/` are
all-reduced with MAX (the value is the same on every rank, so MAX keeps it; SUM would multiply it)."""
LOG_RATIO_BOUND = 20.0
"""SPEC 10.A: every log-ratio is clamped to [-20, 20] before `exp` (verl/slime SAFETY_BOUND)."""
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
STAT_DTYPE = torch.float64
"""Statistics are float64 so that counts stay exact after the all-reduce."""


def masked(x: Tensor, mask: Tensor) -> Tensor:
    """`x` with masked-out positions set to 0 (their gradient is exactly 0, even if `x` was inf/nan there)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def seq_has_tokens(mask: Tensor) -> Tensor:
    """[S] bool: the sequence has at least one token in `mask` (SPEC 9: empty sequences are not counted)."""
    return mask.any(dim=-1)


def group_counts(name: str, mask: Tensor) -> dict[str, Tensor]:
    """Local counts of token group `name` ([S, T] mask): `num_tokens/<name>` and `num_seqs/<name>` (float64)."""
    return {f"num_tokens/{name}": mask.sum().to(STAT_DTYPE),
            f"num_seqs/{name}": seq_has_tokens(mask).sum().to(STAT_DTYPE)}


def clamp_log_ratio(x: Tensor) -> Tensor:
    """`c(x) = clamp(x, -20, 20)`: keeps exp() finite; the gradient is 0 where the clamp is active."""
    return torch.clamp(x, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)


def _denominator(stats: dict[str, Tensor], key: str, like: Tensor) -> Tensor:
    if key not in stats:
        raise KeyError(f"statistic {key!r} missing: pass the all-reduced output of prepare() to loss() "
                       f"(have {sorted(stats)})")
    # A group with no tokens anywhere has a zero numerator too: clamping gives loss 0 with a finite gradient.
    return stats[key].to(dtype=like.dtype, device=like.device).clamp(min=1)


def aggregate(values: Tensor, mask: Tensor, mode: str, stats: dict[str, Tensor], group: str) -> Tensor:
    """This micro-batch's share of the `mode` aggregate of per-token `values` [S, T] over token group `group`.

    token_mean: sum / global tokens; seq_mean_token_mean: sum over sequences of (sequence mean) / global sequences;
    seq_mean_token_sum: sum over sequences of (sequence sum) / global sequences; seq_mean_token_sum_norm (Dr. GRPO,
    SPEC 10.A): sum of every token / (global sequences * L_max). A sequence lies wholly inside one micro-batch, so the
    per-sequence means are exact locally.
    """
    v = masked(values, mask)
    if mode == "token_mean":
        return v.sum() / _denominator(stats, f"num_tokens/{group}", v)
    per_seq = v.sum(dim=-1)
    if mode == "seq_mean_token_mean":
        per_seq = per_seq / mask.sum(dim=-1).clamp(min=1).to(v.dtype)
    elif mode == "seq_mean_token_sum_norm":
        return per_seq.sum() / (_denominator(stats, f"num_seqs/{group}", v) * _denominator(stats, L_MAX, v))
    elif mode != "seq_mean_token_sum":
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {', '.join(AGG_MODES)}")
    return per_seq.sum() / _denominator(stats, f"num_seqs/{group}", v)


def token_mean_share(values: Tensor, mask: Tensor, stats: dict[str, Tensor], group: str) -> Tensor:
    """Additive share of the global token mean of `values` over `group` (metrics: entropies, KL, weights)."""
    return aggregate(values.detach(), mask, "token_mean", stats, group)


def clipped_surrogate(logp: Tensor, old_logp: Tensor, adv: Tensor, clip_low: float, clip_high: float,
                      clip_c: float | None = None, clip: bool = True) -> tuple[Tensor, Tensor]:
    """PPO/GRPO clipped surrogate per token, and where the clipped term was taken.

    `l = -min(r A, clip(r, 1-clip_low, 1+clip_high) A)` with `r = exp(c(logp - old_logp))`; dual clip (only A < 0):
    `l = min(l, -clip_c A)`. `clip=False` (SPEC 10.A, LUFFY/ReLIFT/HPT `loss_remove_clip`): `l = -A r`, no dual clip
    either (their code returns the bare ratio loss), clipped is all False. `adv` broadcasts against `logp`.
    Returns (loss [S, T], clipped [S, T] bool = clipped loss > unclipped loss).
    """
    ratio = torch.exp(clamp_log_ratio(logp - old_logp))
    unclipped = -ratio * adv
    if not clip:
        return unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    clipped = -torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = torch.maximum(unclipped, clipped)
    if clip_c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -clip_c * adv), loss)
    return loss, (clipped > unclipped)


def sft_token_weight(logp: Tensor, mode: str) -> Tensor | None:
    """Detached weight w(p) of the NLL of demo tokens (SPEC 10.A `sft_weight`): none -> None (w = 1),
    dft -> p (DFT), phi -> p (1 - p) (CHORD-phi); p = exp(logp)."""
    if mode == "none":
        return None
    p = torch.exp(logp.detach())
    if mode == "dft":
        return p
    if mode == "phi":
        return p * (1.0 - p)
    raise ValueError(f"unknown sft_weight {mode!r}; expected one of {', '.join(SFT_WEIGHTS)}")


def demo_surrogate(logp: Tensor, adv: Tensor) -> Tensor:
    """Off-policy demo surrogate (SRFT Eq. 9-10): behaviour probability 1, no clipping: `-A exp(logp)`."""
    return -adv * torch.exp(logp)


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate: k1, k2 or k3 (SPEC 10.A: k3's log-ratio is clamped to [-20, 20]
    before exp and its value to [-10, 10]; k1/k2 have no exp and are not clamped)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if estimator == "k3":
        log_ratio = clamp_log_ratio(ref_logp - logp)
        return torch.clamp(torch.exp(log_ratio) - log_ratio - 1.0, min=-10.0, max=10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")
