"""Rollout/trainer mismatch: correction weights (SPEC 10.B `rollout.correction`) and drift metrics.

The rollout engine and the trainer compute log-probs of the same tokens with different kernels, dtypes and (when a
weight sync goes wrong) different weights. `delta_t = logp_old_t - logp_engine_t` measures that gap on rollout tokens
(demos have no engine log-probs and are never corrected). The weights are constants computed once per step after the
old-policy pass (`apply_correction`, called by `Algorithm.prepare_batch`), stored in `Batch.fields[RC_WEIGHT]` and
multiplied into the policy surrogate only (`common.pg_token_parts`).

Statistics are local sums (SUM all-reduce) except keys starting with `max/` (MAX all-reduce; minima are stored negated).
Drift statistics use unclamped log-ratios (SPEC 10.A: metrics are unclamped).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from megahybrid.algorithms.losses import STAT_DTYPE, clamp_log_ratio, masked

if TYPE_CHECKING:  # base.py imports this module (prepare_batch)
    from megahybrid.algorithms.base import Batch

RC_WEIGHT = "rollout_corr/weight"
"""Batch.fields key: [S, T] weight of each token's policy surrogate (1 on demo tokens, 0 on padding rows)."""
MODES = ("none", "token_tis", "seq_tis", "seq_mis", "icepop")
MASK_DEFAULTS = {("seq_mis", "sum"): (0.5, 2.0), ("seq_mis", "geo_mean"): (0.999, 1.001), ("icepop", "sum"): (0.5, 5.0),
                 ("icepop", "geo_mean"): (0.5, 5.0)}
"""SPEC 10.B default bounds (verl Seq-MIS / Geo-RS presets, NeMo-RL icepop)."""


@dataclass(frozen=True)
class Correction:
    """Resolved correction settings (aliases and mode-dependent defaults applied)."""

    mode: str = "none"
    is_cap: float = 2.0
    is_lo: float = 0.0
    mask_lo: float = 0.5
    mask_hi: float = 2.0
    seq_stat: str = "sum"
    reject_scope: str = "weight"

    @classmethod
    def resolve(cls, rollout, algo_cfg) -> "Correction":
        """From `RolloutConfig` (None: defaults) and the algorithm config (`tis_cap` is an alias for token_tis)."""
        mode = getattr(rollout, "correction", "none") if rollout is not None else "none"
        is_cap = getattr(rollout, "is_cap", None)
        tis_cap = getattr(algo_cfg, "tis_cap", None)
        if tis_cap is not None and mode == "none":
            mode = "token_tis"
        cap = is_cap if is_cap is not None else (tis_cap if tis_cap is not None else 2.0)
        seq_stat = getattr(rollout, "seq_stat", "sum")
        lo_default, hi_default = MASK_DEFAULTS.get((mode, seq_stat), (0.5, 2.0))
        mask_lo, mask_hi = getattr(rollout, "mask_lo", None), getattr(rollout, "mask_hi", None)
        return cls(mode=mode, is_cap=float(cap), is_lo=float(getattr(rollout, "is_lo", 0.0) or 0.0),
                   mask_lo=float(lo_default if mask_lo is None else mask_lo),
                   mask_hi=float(hi_default if mask_hi is None else mask_hi), seq_stat=seq_stat,
                   reject_scope=getattr(rollout, "reject_scope", "weight"))


def correction_weights(old_logp: Tensor, engine_logp: Tensor, mask: Tensor,
                       corr: Correction) -> tuple[Tensor, Tensor]:
    """Weights of SPEC 10.B's table on `mask` tokens (rollout tokens) [S, T], computed without gradient.

    Returns (w [S, T] (0 off `mask`), out_of_bounds [S, T] bool on `mask`: tis modes, the raw ratio was outside
    [lo, cap]; mask modes, the bound test rejected the token (icepop) or its sequence (seq_mis))."""
    with torch.no_grad():
        delta = masked(old_logp.double() - engine_logp.double(), mask)
        r = torch.exp(clamp_log_ratio(delta))
        seq_sum = delta.sum(-1, keepdim=True)
        n = mask.sum(-1, keepdim=True).clamp(min=1).to(delta.dtype)
        mode = corr.mode
        if mode == "token_tis":
            w, oob = r.clamp(min=corr.is_lo, max=corr.is_cap), (r < corr.is_lo) | (r > corr.is_cap)
        elif mode == "seq_tis":
            big_r = torch.exp(clamp_log_ratio(seq_sum)).expand_as(r)
            w, oob = big_r.clamp(min=corr.is_lo, max=corr.is_cap), (big_r < corr.is_lo) | (big_r > corr.is_cap)
        elif mode == "seq_mis":
            stat = seq_sum if corr.seq_stat == "sum" else seq_sum / n
            big = torch.exp(clamp_log_ratio(stat)).expand_as(r)
            keep = (big >= corr.mask_lo) & (big <= corr.mask_hi)
            w, oob = torch.where(keep, big if corr.seq_stat == "sum" else r, torch.zeros_like(r)), ~keep
        elif mode == "icepop":
            keep = (r >= corr.mask_lo) & (r <= corr.mask_hi)
            w, oob = torch.where(keep, r, torch.zeros_like(r)), ~keep
        else:
            raise ValueError(f"unknown rollout.correction {mode!r}; expected one of {', '.join(MODES)}")
        return masked(w, mask), oob & mask


def mismatch_stats(old_logp: Tensor, engine_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Local sums of the drift metrics over `mask` tokens (unclamped, float64)."""
    with torch.no_grad():
        delta = masked(old_logp.double() - engine_logp.double(), mask)
        zero = torch.zeros((), dtype=STAT_DTYPE, device=delta.device)
        k3 = masked(torch.exp(delta) - delta - 1.0, mask)
        return {"mismatch/num_tokens": mask.sum().to(STAT_DTYPE), "mismatch/sum_abs": delta.abs().sum(),
                "max/mismatch_abs": torch.where(mask, delta.abs(), zero - float("inf")).max() if mask.numel()
                else zero - float("inf"),
                "mismatch/sum_k1": (-delta).sum(), "mismatch/sum_k3": k3.sum(),
                "mismatch/sum_mult": masked(torch.exp(delta.abs()), mask).sum()}


DRIFT_STATS = ("mismatch/num_tokens", "mismatch/sum_abs", "max/mismatch_abs", "mismatch/sum_k1", "mismatch/sum_k3",
               "mismatch/sum_mult")
"""The keys of `mismatch_stats` (when the old log-probs come from the training forward, the loss emits them as
metric shares and the trainer moves them into the statistics)."""


def weight_stats(w: Tensor, oob: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Local sums of the `rollout_corr/*` metrics (tokens on `mask`; sequence counts for per-sequence modes)."""
    with torch.no_grad():
        inf = torch.full((), float("inf"), dtype=STAT_DTYPE, device=w.device)
        seqs = mask.any(-1)
        seq_oob = (oob & mask).any(-1) & seqs
        has = mask.numel() > 0 and bool(mask.any())
        return {"rollout_corr/num_tokens": mask.sum().to(STAT_DTYPE),
                "rollout_corr/num_seqs": seqs.sum().to(STAT_DTYPE),
                "rollout_corr/sum_w": masked(w, mask).sum().to(STAT_DTYPE),
                "rollout_corr/sum_w2": masked(w * w, mask).sum().to(STAT_DTYPE),
                "max/rc_w": torch.where(mask, w, -inf).max().to(STAT_DTYPE) if has else -inf,
                "max/rc_neg_w": torch.where(mask, -w, -inf).max().to(STAT_DTYPE) if has else -inf,
                "rollout_corr/oob_tokens": (oob & mask).sum().to(STAT_DTYPE),
                "rollout_corr/oob_seqs": seq_oob.sum().to(STAT_DTYPE)}


def apply_correction(batch: Batch, corr: Correction) -> tuple[Batch, dict[str, Tensor]]:
    """Drift statistics whenever engine and old log-probs exist; with a correction mode, the weights field (and,
    for `reject_scope: mask`, rejected tokens removed from `response_mask`). Returns (batch, local stats)."""
    if batch.old_logp is None or batch.engine_logp is None:
        has_rollout_tokens = bool((batch.response_mask & ~batch.is_demo[:, None]).any())
        if corr.mode != "none" and batch.engine_logp is None and has_rollout_tokens:
            raise ValueError(f"rollout.correction={corr.mode} needs the engine's log-probs but Batch.engine_logp "
                             f"is None")
        return batch, {}
    rollout = batch.response_mask & ~batch.is_demo[:, None]
    stats = mismatch_stats(batch.old_logp, batch.engine_logp, rollout)
    if corr.mode == "none":
        return batch, stats
    w, oob = correction_weights(batch.old_logp, batch.engine_logp, rollout, corr)
    stats.update(weight_stats(w, oob, rollout))
    fields = {**batch.fields, RC_WEIGHT: torch.where(rollout, w, torch.ones_like(w))}
    response_mask = batch.response_mask
    if corr.reject_scope == "mask" and corr.mode in ("seq_mis", "icepop"):
        response_mask = response_mask & ~(oob & rollout)  # verl: rejected tokens leave every term and count
    return dataclasses.replace(batch, response_mask=response_mask, fields=fields), stats


def correction_metrics(stats: dict[str, Tensor], corr: Correction) -> dict[str, float]:
    """Final `mismatch/*` and `rollout_corr/*` metrics from the all-reduced statistics."""
    out: dict[str, float] = {}
    n = float(stats.get("mismatch/num_tokens", 0.0))
    if n > 0:
        out["mismatch/logp_abs_diff_mean"] = float(stats["mismatch/sum_abs"]) / n
        out["mismatch/logp_abs_diff_max"] = float(stats["max/mismatch_abs"])
        out["mismatch/k1"] = float(stats["mismatch/sum_k1"]) / n
        out["mismatch/k3"] = float(stats["mismatch/sum_k3"]) / n
        out["mismatch/mult_prob_error"] = float(stats["mismatch/sum_mult"]) / n
    n = float(stats.get("rollout_corr/num_tokens", 0.0))
    if n > 0:
        mean_w = float(stats["rollout_corr/sum_w"]) / n
        mean_w2 = float(stats["rollout_corr/sum_w2"]) / n
        out["rollout_corr/weight_mean"] = mean_w
        out["rollout_corr/weight_max"] = float(stats["max/rc_w"])
        out["rollout_corr/weight_min"] = -float(stats["max/rc_neg_w"])
        out["rollout_corr/ess"] = mean_w * mean_w / mean_w2 if mean_w2 > 0 else 0.0
        num_seqs = max(float(stats["rollout_corr/num_seqs"]), 1.0)
        per_seq = corr.mode in ("seq_tis", "seq_mis")
        frac = float(stats["rollout_corr/oob_seqs"]) / num_seqs if per_seq else \
            float(stats["rollout_corr/oob_tokens"]) / n
        if corr.mode in ("token_tis", "seq_tis"):
            out["rollout_corr/clip_frac"] = frac
        else:
            out["rollout_corr/masked_frac"] = frac
            if corr.mode == "seq_mis":
                out["rollout_corr/masked_token_frac"] = float(stats["rollout_corr/oob_tokens"]) / n
    return out
