"""Slow, independent re-statements of SPEC.md sections 1-4 and 9, written from the text with explicit Python loops
over prompts, samples and tokens (float64). Control values (rewards, masks, old/ref/engine log-probs, H_old) are
read as Python floats; the differentiable inputs (`logp`, `entropy`, SuperRL log-sigmas) stay 0-dim tensors so
autograd gives the reference gradient. Nothing here imports megahybrid.algorithms.
"""
from __future__ import annotations

import math

import torch

ZERO = torch.zeros((), dtype=torch.float64)


class View:
    """Python lists of a Batch's control values."""

    def __init__(self, batch, rewards=None):
        self.S, self.T = batch.tokens.shape
        self.prompt = batch.prompt_index.tolist()
        self.demo = batch.is_demo.tolist()
        self.reward = list(batch.rewards.tolist()) if rewards is None else rewards
        self.mask = batch.response_mask.tolist()

        def rows(x):
            return None if x is None else x.tolist()

        self.old, self.ref = rows(batch.old_logp), rows(batch.ref_logp)
        self.engine, self.old_h = rows(batch.engine_logp), rows(batch.old_entropy)

    def tokens(self, s):
        return [t for t in range(self.T) if self.mask[s][t]]

    def prompts(self):
        out = []
        for p in self.prompt:
            if p not in out:
                out.append(p)
        return out

    def seqs(self, p, demo=None):
        return [s for s in range(self.S) if self.prompt[s] == p and (demo is None or self.demo[s] == demo)]


def tsum(values):
    total = ZERO
    for v in values:
        total = total + v
    return total


# ------------------------------------------------------------------------------------------------- section 2
def advantages_of_group(rewards, norm=True, eps=1e-6):
    n = len(rewards)
    if n <= 1 or all(r == rewards[0] for r in rewards):
        return [0.0] * n
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))
    return [(r - mean) / (std + eps) if norm else r - mean for r in rewards]


def group_advantages(view, member, norm=True, eps=1e-6):
    """{sequence: A}; non-members get 0."""
    adv = {s: 0.0 for s in range(view.S)}
    for p in view.prompts():
        members = [s for s in view.seqs(p) if member(s)]
        for s, a in zip(members, advantages_of_group([view.reward[s] for s in members], norm, eps)):
            adv[s] = a
    return adv


# ------------------------------------------------------------------------------------------------- section 3
L_MAX = 13
"""rollout.max_new_tokens the tests give the algorithms (L_max of seq_mean_token_sum_norm, SPEC 10.A)."""


def clamp20(x):
    """SPEC 10.A: c(x) = clamp(x, -20, 20) before every exp of a log-ratio (a constant where active: no gradient)."""
    if x > 20:
        return ZERO + 20.0 if torch.is_tensor(x) else 20.0
    if x < -20:
        return ZERO - 20.0 if torch.is_tensor(x) else -20.0
    return x


def clipped_token(lp, old, adv, low, high, dual, clip=True):
    """(loss, clipped?) of `-min(r A, clip(r, 1-low, 1+high) A)`, dual clip for A < 0; clip=False: `-A r`."""
    ratio = torch.exp(clamp20(lp - old))
    if not clip:
        return -ratio * adv, False
    if ratio < 1 - low:
        clipped_ratio = ZERO + (1 - low)
    elif ratio > 1 + high:
        clipped_ratio = ZERO + (1 + high)
    else:
        clipped_ratio = ratio
    a, b = ratio * adv, clipped_ratio * adv
    loss = -(a if a <= b else b)
    took_clipped = float(-b.detach()) > float(-a.detach())
    if dual is not None and adv < 0 and loss > -dual * adv:
        loss = ZERO + (-dual * adv)
    return loss, took_clipped


def kl_token(lp, ref, estimator):
    if estimator == "k1":
        return lp - ref
    if estimator == "k2":
        return 0.5 * (lp - ref) ** 2
    x = clamp20(ref - lp)
    value = torch.exp(x) - x - 1
    if value > 10:
        return ZERO + 10.0
    if value < -10:
        return ZERO - 10.0
    return value


def aggregate(seq_losses, mode):
    """seq_losses: a list (one per sequence) of lists of per-token losses."""
    seqs = [ls for ls in seq_losses if ls]
    if not seqs:
        return ZERO
    if mode == "token_mean":
        return tsum(v for ls in seqs for v in ls) / sum(len(ls) for ls in seqs)
    if mode == "seq_mean_token_mean":
        return tsum(tsum(ls) / len(ls) for ls in seqs) / len(seqs)
    if mode == "seq_mean_token_sum_norm":
        return tsum(tsum(ls) for ls in seqs) / (len(seqs) * L_MAX)
    assert mode == "seq_mean_token_sum"
    return tsum(tsum(ls) for ls in seqs) / len(seqs)


def with_rollout(cfg, rollout):
    """The algorithm config plus a `rollout` attribute (the rollout.* keys the loop reference reads)."""
    import types

    return types.SimpleNamespace(**vars(cfg), rollout=rollout)


def reject_tokens(cfg, batch):
    """`rollout.reject_scope: mask` (SPEC 10.B): a copy of the batch without the rollout tokens whose weight the
    bound test of seq_mis / icepop set to 0 (they leave every term and count)."""
    import dataclasses

    ro = cfg.rollout
    if ro is None or ro.reject_scope != "mask" or ro.correction not in ("seq_mis", "icepop"):
        return batch
    v = View(batch)
    mask = batch.response_mask.clone()
    for s in range(v.S):
        for t in v.tokens(s):
            if not v.demo[s] and rc_weight(cfg, v, s, t) == 0.0:
                mask[s, t] = False
    return dataclasses.replace(batch, response_mask=mask)


def rc_weight(cfg, view, s, t):
    """SPEC 10.B weight of rollout token t of sequence s (1 on demos). `cfg.rollout` (when the test attached one)
    holds the rollout.* keys; `algorithm.tis_cap` alone means token_tis with that cap."""
    ro = getattr(cfg, "rollout", None)
    mode = ro.correction if ro is not None else "none"
    if mode == "none" and cfg.tis_cap is not None:
        mode = "token_tis"
    if mode == "none" or view.demo[s]:
        return 1.0
    cap = ro.is_cap if ro is not None and ro.is_cap is not None else (cfg.tis_cap if cfg.tis_cap is not None else 2.0)
    lo = ro.is_lo if ro is not None else 0.0
    stat = ro.seq_stat if ro is not None else "sum"
    defaults = {"seq_mis": (0.5, 2.0) if stat == "sum" else (0.999, 1.001), "icepop": (0.5, 5.0)}.get(mode)
    m_lo = ro.mask_lo if ro is not None and ro.mask_lo is not None else (defaults or (0, 0))[0]
    m_hi = ro.mask_hi if ro is not None and ro.mask_hi is not None else (defaults or (0, 0))[1]
    deltas = [view.old[s][u] - view.engine[s][u] for u in view.tokens(s)]
    r = math.exp(clamp20(view.old[s][t] - view.engine[s][t]))
    if mode == "token_tis":
        return min(max(r, lo), cap)
    big_r = math.exp(clamp20(sum(deltas)))
    if mode == "seq_tis":
        return min(max(big_r, lo), cap)
    if mode == "seq_mis" and stat == "sum":
        return big_r if m_lo <= big_r <= m_hi else 0.0
    if mode == "seq_mis":
        g = math.exp(clamp20(sum(deltas) / len(deltas)))
        return r if m_lo <= g <= m_hi else 0.0
    assert mode == "icepop"
    return r if m_lo <= r <= m_hi else 0.0


def pg_token(cfg, view, s, t, logp, entropy, adv, kl_coef, weight=1.0):
    """Clipped surrogate x rollout-correction weight x weight, + kl_coef KL - entropy_coef H for token t of s."""
    lp = logp[s, t]
    loss, took = clipped_token(lp, view.old[s][t], adv, cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c,
                               getattr(cfg, "clip", True))
    loss = loss * rc_weight(cfg, view, s, t) * weight
    if kl_coef > 0:
        loss = loss + kl_coef * kl_token(lp, view.ref[s][t], cfg.kl_estimator)
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * entropy[s, t]
    return loss, took


def sft_w(cfg, lp):
    """SPEC 10.A `sft_weight` of a demo token's NLL, a constant: none 1, dft p, phi p (1 - p)."""
    p = math.exp(float(lp.detach()))
    mode = getattr(cfg, "sft_weight", "none")
    return {"none": 1.0, "dft": p, "phi": p * (1 - p)}[mode]


# ------------------------------------------------------------------------------------------------- section 4
def sft(cfg, batch, logp, kl_coef=0.0):
    v = View(batch)
    losses = []
    for s in range(v.S):
        if v.demo[s]:
            row = []
            for t in v.tokens(s):
                value = -sft_w(cfg, logp[s, t]) * logp[s, t]
                if kl_coef > 0:
                    value = value + kl_coef * kl_token(logp[s, t], v.ref[s][t], cfg.kl_estimator)
                row.append(value)
            losses.append(row)
    return aggregate(losses, cfg.loss_agg)


def grpo(cfg, batch, logp, entropy, kl_coef):
    v = View(batch)
    adv = group_advantages(v, lambda s: not v.demo[s], cfg.norm_adv_by_std, cfg.adv_eps)
    losses, clipped, count = [], 0, 0
    for s in range(v.S):
        if not v.demo[s]:
            row = []
            for t in v.tokens(s):
                loss, took = pg_token(cfg, v, s, t, logp, entropy, adv[s], kl_coef)
                row.append(loss)
                clipped, count = clipped + took, count + 1
            losses.append(row)
    return aggregate(losses, cfg.loss_agg), {"actor/clip_frac": clipped / max(count, 1)}


def srft(cfg, batch, logp, entropy):
    rewards = [1.0 if d and cfg.demo_reward == "one" else r
               for d, r in zip(batch.is_demo.tolist(), batch.rewards.tolist())]
    v = View(batch, rewards)
    adv = group_advantages(v, lambda s: True, cfg.norm_adv_by_std, cfg.adv_eps)  # demos join the group
    pos = [s for s in range(v.S) if not v.demo[s] and v.reward[s] > 0]
    neg = [s for s in range(v.S) if not v.demo[s] and v.reward[s] <= 0]
    demos = [s for s in range(v.S) if v.demo[s]]
    h_demo = [v.old_h[s][t] for s in demos for t in v.tokens(s)]
    h_pos = [v.old_h[s][t] for s in pos for t in v.tokens(s)]
    h_demo = sum(h_demo) / len(h_demo) if h_demo else 0.0
    h_pos = sum(h_pos) / len(h_pos) if h_pos else 0.0

    def weight(kind, s, t):
        fixed = cfg.sft_coef_fixed if kind == "sft" else cfg.rl_coef_fixed
        if not cfg.entropy_weights:
            return 1.0
        if fixed is not None:
            return fixed
        h = (h_demo if kind == "sft" else h_pos) if cfg.entropy_scope == "batch" else v.old_h[s][t]
        return cfg.sft_coef * math.exp(-h) if kind == "sft" else cfg.rl_coef * math.exp(h)

    sft_demo = aggregate([[-weight("sft", s, t) * logp[s, t] for t in v.tokens(s)] for s in demos], cfg.loss_agg)
    rl_demo = aggregate([[-adv[s] * torch.exp(logp[s, t]) for t in v.tokens(s)] for s in demos], cfg.loss_agg)
    rollouts = [s for s in range(v.S) if not v.demo[s]]
    if cfg.self_rollout_loss == "grpo":
        self_loss = aggregate([[pg_token(cfg, v, s, t, logp, entropy, adv[s], cfg.kl_coef,
                                         weight("rl", s, t) if v.reward[s] > 0 else 1.0)[0]
                                for t in v.tokens(s)] for s in rollouts], cfg.loss_agg)
    else:
        pos_loss = aggregate([[-weight("rl", s, t) * logp[s, t] for t in v.tokens(s)] for s in pos], cfg.loss_agg)
        neg_loss = aggregate([[logp[s, t] for t in v.tokens(s)] for s in neg], cfg.loss_agg)
        reg = []
        for s in rollouts:
            row = []
            for t in v.tokens(s):
                value = ZERO
                if cfg.kl_coef > 0:
                    value = value + cfg.kl_coef * kl_token(logp[s, t], v.ref[s][t], cfg.kl_estimator)
                row.append(value - cfg.entropy_coef * entropy[s, t])
            reg.append(row)
        self_loss = pos_loss + neg_loss + aggregate(reg, cfg.loss_agg)
    metrics = {"srft/w_sft_batch": weight("sft", 0, 0) if cfg.entropy_scope == "batch" else None,
               "srft/w_rl_batch": weight("rl", 0, 0) if cfg.entropy_scope == "batch" else None}
    return sft_demo + rl_demo + self_loss, metrics


def superrl_gated(cfg, batch, logp, entropy):
    v = View(batch)
    adv = group_advantages(v, lambda s: not v.demo[s], cfg.norm_adv_by_std, cfg.adv_eps)  # rollouts only
    prompt_losses, num_sft, num_no_signal = [], 0, 0
    for p in v.prompts():
        rolls, demos = v.seqs(p, demo=False), v.seqs(p, demo=True)
        signal = [v.reward[s] > 0 if cfg.gate == "reward" else adv[s] > 0 for s in rolls]
        c = any(signal)
        if c:
            branch = [[pg_token(cfg, v, s, t, logp, entropy, adv[s], cfg.kl_coef)[0] for t in v.tokens(s)]
                      for s in rolls]
        else:
            branch = [[-sft_w(cfg, logp[s, t]) * logp[s, t] for t in v.tokens(s)] for s in demos]
        has_demo = any(v.tokens(s) for s in demos)
        if not c and has_demo:
            num_sft += 1
        if not c and not has_demo:
            num_no_signal += 1
        if any(branch):
            prompt_losses.append(aggregate(branch, cfg.loss_agg))
    loss = tsum(prompt_losses) / len(prompt_losses) if prompt_losses else ZERO
    num_prompts = len(v.prompts())
    return loss, {"superrl/sft_frac": num_sft / num_prompts, "superrl/no_signal": float(num_no_signal)}


def superrl_uncertainty(cfg, batch, logp, entropy, s_pg, s_sft):
    v = View(batch)
    adv = group_advantages(v, lambda s: not v.demo[s], cfg.norm_adv_by_std, cfg.adv_eps)
    l_pg = aggregate([[pg_token(cfg, v, s, t, logp, entropy, adv[s], cfg.kl_coef)[0] for t in v.tokens(s)]
                      for s in range(v.S) if not v.demo[s]], cfg.loss_agg)
    l_sft = aggregate([[-sft_w(cfg, logp[s, t]) * logp[s, t] for t in v.tokens(s)] for s in range(v.S) if v.demo[s]],
                      cfg.loss_agg)
    loss = torch.exp(-2 * s_pg) * l_pg + torch.exp(-2 * s_sft) * l_sft
    # Convention (superrl.py): a branch without any token this step drops its log-sigma term as well.
    if any(v.tokens(s) for s in range(v.S) if not v.demo[s]):
        loss = loss + s_pg
    if any(v.tokens(s) for s in range(v.S) if v.demo[s]):
        loss = loss + s_sft
    return loss


def token_group_mean(batch, values, member):
    """Mean of values[s][t] over response tokens of sequences with member(s) (0 if none)."""
    v = View(batch)
    xs = [values[s][t] for s in range(v.S) if member(s) for t in v.tokens(s)]
    return sum(xs) / len(xs) if xs else 0.0
