"""Pieces every method shares: token groups of a batch, the statistics they all need, the policy-gradient token
loss (clipped surrogate x TIS + KL + entropy bonus) and the SFT token loss (NLL, optional KL).

Token groups (bool [S, T], response tokens only): `demo`, `rollout`, `rollout_pos` (rollouts with R > 0) and
`rollout_neg` (R <= 0). Their local counts go into the statistics as `num_tokens/<group>` and `num_seqs/<group>`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import Tensor

from megahybrid.algorithms.advantages import dense_groups
from megahybrid.algorithms.base import Batch
from megahybrid.algorithms.correction import RC_WEIGHT
from megahybrid.algorithms.losses import (STAT_DTYPE, aggregate, clipped_surrogate, group_counts, kl_estimate,
                                          masked, sft_token_weight, token_mean_share)
from megahybrid.config.schema import AlgorithmConfig

@dataclass
class DrGRPOConfig(AlgorithmConfig):
    """The RL settings shared by the LUFFY, ReLIFT and HPT recipes (Dr. GRPO style): mean-only advantages, the
    L_max-normalised sequence sum, no ratio clipping, entropy bonus 0.001, no KL."""

    norm_adv_by_std: bool = False
    """Divide advantages by the group std (recipes: `grpo_use_std=False` / `norm_adv_by_std_in_grpo=False`)."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"] = \
        "seq_mean_token_sum_norm"
    """Aggregation of the policy-gradient loss (recipes `loss_remove_token_mean=True`)."""
    clip: bool = False
    """PPO clipping of the ratio (recipes `loss_remove_clip=True`)."""
    entropy_coef: float = 0.001
    """Entropy bonus coefficient (recipes `entropy_coeff=0.001`)."""


ADV = "adv"
"""Batch.fields key of the per-sequence advantage [S]."""


def token_groups(batch: Batch) -> dict[str, Tensor]:
    """The standard token groups of a batch, each [S, T] bool."""
    resp = batch.response_mask
    demo = batch.is_demo[:, None]
    positive = (batch.rewards > 0)[:, None]
    return {"demo": resp & demo, "rollout": resp & ~demo,
            "rollout_pos": resp & ~demo & positive, "rollout_neg": resp & ~demo & ~positive}


def base_stats(batch: Batch) -> dict[str, Tensor]:
    """Local statistics every method needs: group counts, sequence/prompt counts and the rollout reward sum."""
    stats: dict[str, Tensor] = {}
    for name, mask in token_groups(batch).items():
        stats.update(group_counts(name, mask))
    rollout = ~batch.is_demo
    stats["num_rollouts"] = rollout.sum().to(STAT_DTYPE)
    stats["num_demos"] = batch.is_demo.sum().to(STAT_DTYPE)
    device = batch.tokens.device  # statistics live where the batch lives (NCCL all-reduces CUDA tensors)
    stats["num_sequences"] = torch.tensor(float(batch.num_sequences), dtype=STAT_DTYPE, device=device)
    stats["num_prompts"] = torch.tensor(float(dense_groups(batch.prompt_index)[1]), dtype=STAT_DTYPE, device=device)
    stats["sum/reward"] = batch.rewards[rollout].detach().sum().to(STAT_DTYPE)
    return stats


def batch_metrics(stats: dict[str, Tensor]) -> dict[str, float]:
    """Final `reward/mean` and `response_length/mean` over rollouts, `response_length/demo` over demos (each only
    when the step has such sequences)."""
    out: dict[str, float] = {}
    n_roll, n_demo = float(stats["num_rollouts"]), float(stats["num_demos"])
    if n_roll > 0:
        out["reward/mean"] = float(stats["sum/reward"]) / n_roll
        out["response_length/mean"] = float(stats["num_tokens/rollout"]) / n_roll
    if n_demo > 0:
        out["response_length/demo"] = float(stats["num_tokens/demo"]) / n_demo
    out["batch/num_prompts"] = float(stats["num_prompts"])
    return out


def entropy_metrics(mb: Batch, entropy: Tensor, stats: dict[str, Tensor], groups: Iterable[str]) -> dict[str, Tensor]:
    """Additive shares of the mean current-policy entropy of each token group: `entropy/<group>`."""
    masks = token_groups(mb)
    return {f"entropy/{g}": token_mean_share(entropy, masks[g], stats, g) for g in groups}


def require(mb: Batch, name: str, why: str) -> Tensor:
    value = getattr(mb, name)
    if value is None:
        raise ValueError(f"Batch.{name} is None but {why}: the trainer must fill it before prepare()/loss()")
    return value


def regulariser_parts(cfg: AlgorithmConfig, mb: Batch, logp: Tensor, entropy: Tensor, mask: Tensor,
                      kl_coef: float) -> dict[str, Tensor]:
    """Per-token [S, T] `entropy` (masked current entropy, for the bonus) and `kl` (only when kl_coef > 0)."""
    parts = {"entropy": masked(entropy, mask)}
    if kl_coef > 0:
        ref = masked(require(mb, "ref_logp", "a KL term is on"), mask)
        parts["kl"] = kl_estimate(masked(logp, mask), ref, cfg.kl_estimator)
    return parts


def pg_token_parts(cfg: AlgorithmConfig, mb: Batch, logp: Tensor, entropy: Tensor, mask: Tensor, adv: Tensor,
                   kl_coef: float, surrogate_weight: Tensor | None = None) -> dict[str, Tensor]:
    """Per-token pieces [S, T] of the policy-gradient loss on `mask`: the regulariser parts plus

    `surrogate` = w * rc * clipped surrogate (`adv` [S] broadcast over tokens; `surrogate_weight` [S, T], a
    constant, is SRFT's w_rl; `rc` is the rollout-correction weight of `prepare_batch` (1 on demo tokens), which
    multiplies only the surrogate, after clipping and dual clip, SPEC 10.B) and `clipped` (bool).
    """
    lp = masked(logp, mask)
    old = masked(require(mb, "old_logp", "the clipped surrogate needs the old policy's log-probs"), mask)
    surr, clipped = clipped_surrogate(lp, old, adv.to(lp.dtype)[:, None], cfg.clip_ratio_low, cfg.clip_ratio_high,
                                      cfg.clip_ratio_c, clip=cfg.clip)
    if RC_WEIGHT in mb.fields:
        surr = surr * masked(mb.fields[RC_WEIGHT].to(lp.dtype), mask).detach()
    if surrogate_weight is not None:
        surr = surr * surrogate_weight.detach()
    return {"surrogate": surr, "clipped": clipped & mask, **regulariser_parts(cfg, mb, logp, entropy, mask, kl_coef)}


def pg_token_loss(parts: dict[str, Tensor], kl_coef: float, entropy_coef: float) -> Tensor:
    """[S, T] per-token policy-gradient loss `surrogate + kl_coef * KL - entropy_coef * H` (SPEC 3)."""
    loss = parts["surrogate"]
    if "kl" in parts:
        loss = loss + kl_coef * parts["kl"]
    if entropy_coef:
        loss = loss - entropy_coef * parts["entropy"]
    return loss


def aggregate_regularisers(cfg: AlgorithmConfig, parts: dict[str, Tensor], mask: Tensor, stats: dict[str, Tensor],
                           group: str, kl_coef: float, entropy_coef: float) -> tuple[Tensor, dict[str, Tensor]]:
    """`kl_coef * agg(KL) - entropy_coef * agg(H)` over token group `group`, with metric shares `loss/kl`,
    `actor/kl` (token mean of the estimate) and `loss/entropy`."""
    loss = torch.zeros((), dtype=parts["entropy"].dtype, device=parts["entropy"].device)
    metrics: dict[str, Tensor] = {}
    if "kl" in parts:
        kl_part = kl_coef * aggregate(parts["kl"], mask, cfg.loss_agg, stats, group)
        loss = loss + kl_part
        metrics["loss/kl"] = kl_part.detach()
        metrics["actor/kl"] = token_mean_share(parts["kl"], mask, stats, group)
    if entropy_coef:
        ent_part = -entropy_coef * aggregate(parts["entropy"], mask, cfg.loss_agg, stats, group)
        loss = loss + ent_part
        metrics["loss/entropy"] = ent_part.detach()
    return loss, metrics


def aggregate_pg(cfg: AlgorithmConfig, parts: dict[str, Tensor], mask: Tensor, stats: dict[str, Tensor],
                 group: str, kl_coef: float, prefix: str = "loss/pg") -> tuple[Tensor, dict[str, Tensor]]:
    """`loss.agg` of the per-token policy-gradient loss over token group `group`. Aggregation is linear, so the
    surrogate and the regularisers are aggregated separately (for the metrics) and summed. Metric shares:
    `<prefix>` (the surrogate part), `actor/clip_frac` and those of `aggregate_regularisers`."""
    surr = aggregate(parts["surrogate"], mask, cfg.loss_agg, stats, group)
    reg, metrics = aggregate_regularisers(cfg, parts, mask, stats, group, kl_coef, cfg.entropy_coef)
    metrics[prefix] = surr.detach()
    metrics["actor/clip_frac"] = token_mean_share(parts["clipped"].to(parts["surrogate"].dtype), mask, stats, group)
    return surr + reg, metrics


def sft_token_loss(mb: Batch, logp: Tensor, mask: Tensor, weight: str = "none") -> Tensor:
    """Per-token NLL `-w(p) logp` [S, T] on `mask`; `weight` is `algorithm.sft_weight` (SPEC 10.A: none / dft / phi,
    w detached)."""
    lp = masked(logp, mask)
    w = sft_token_weight(lp, weight)
    return -lp if w is None else -w * lp


def common_problems(cfg: AlgorithmConfig) -> list[str]:
    """Problems with the shared AlgorithmConfig fields (each names its key)."""
    problems = []
    if cfg.clip_ratio_low < 0 or cfg.clip_ratio_low >= 1:
        problems.append(f"clip_ratio_low: must be in [0, 1), got {cfg.clip_ratio_low}")
    if cfg.clip_ratio_high < 0:
        problems.append(f"clip_ratio_high: must be >= 0, got {cfg.clip_ratio_high}")
    if cfg.clip_ratio_c is not None and cfg.clip_ratio_c <= 1:
        problems.append(f"clip_ratio_c: the dual-clip constant must be > 1 (or null), got {cfg.clip_ratio_c}")
    if cfg.tis_cap is not None and cfg.tis_cap <= 0:
        problems.append(f"tis_cap: must be > 0 (or null), got {cfg.tis_cap}")
    if cfg.kl_coef < 0:
        problems.append(f"kl_coef: must be >= 0, got {cfg.kl_coef}")
    if cfg.adv_eps < 0:
        problems.append(f"adv_eps: must be >= 0, got {cfg.adv_eps}")
    return problems
