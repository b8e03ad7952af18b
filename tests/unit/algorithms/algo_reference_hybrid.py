"""Slow loop re-statements of SPEC 10.C (luffy, chord, hpt, dft), written from the text like algo_reference (whose
helpers for sections 1-3 and 10.A/10.B they reuse). Nothing here imports megahybrid.algorithms."""
from __future__ import annotations

import math

import torch

from algo_reference import ZERO, View, advantages_of_group, aggregate, pg_token, sft_w, tsum


def luffy(cfg, batch, logp, entropy):
    """SPEC 4.7 on a batch whose groups were already cut to n members."""
    v = View(batch)
    adv = {}
    for p in v.prompts():
        members = v.seqs(p)
        stat_members = [s for s in members if not v.demo[s]] if cfg.adv_group == "rollouts" else members
        rs = [v.reward[s] for s in stat_members]
        if len(rs) <= 1 or all(r == rs[0] for r in rs):
            for s in members:
                adv[s] = 0.0
            continue
        mean = sum(rs) / len(rs)
        std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (len(rs) - 1))
        for s in members:
            adv[s] = (v.reward[s] - mean) / (std + cfg.adv_eps) if cfg.norm_adv_by_std else v.reward[s] - mean
    rows, ent = [], []
    for s in range(v.S):
        row = []
        for t in v.tokens(s):
            if v.demo[s]:
                prob = torch.exp(logp[s, t])
                f = prob if cfg.gamma is None else prob / (prob + cfg.gamma)
                row.append(-adv[s] * f)
            else:
                # pg_token subtracts the per-token entropy bonus; LUFFY's bonus is a token mean over all tokens
                row.append(pg_token(cfg, v, s, t, logp, entropy, adv[s], 0.0)[0] + cfg.entropy_coef * entropy[s, t])
            ent.append(entropy[s, t])
        rows.append(row)
    entropy_term = tsum(ent) / len(ent) if ent else ZERO
    return aggregate(rows, cfg.loss_agg) - cfg.entropy_coef * entropy_term


def hpt(cfg, batch, logp, entropy):
    """SPEC 4.11."""
    v = View(batch)
    sft_rows, pg_rows, num_sft = [], [], 0
    for p in v.prompts():
        rolls, demos = v.seqs(p, demo=False), v.seqs(p, demo=True)
        correct = sum(1 for s in rolls if v.reward[s] > 0)
        if correct <= cfg.gate and demos:
            num_sft += 1
            s = demos[0]
            sft_rows.append([-sft_w(cfg, logp[s, t]) * logp[s, t] for t in v.tokens(s)])
        else:
            advs = advantages_of_group([v.reward[s] for s in rolls], cfg.norm_adv_by_std, cfg.adv_eps)
            for s, a in zip(rolls, advs):
                pg_rows.append([pg_token(cfg, v, s, t, logp, entropy, a, cfg.kl_coef)[0] for t in v.tokens(s)])
    loss = cfg.sft_coef * aggregate(sft_rows, "token_mean") + aggregate(pg_rows, cfg.loss_agg)
    return loss, {"hpt/sft_frac": num_sft / len(v.prompts())}


def chord_mu(s, warmup, decay, peak, valley):
    if s < warmup:
        return peak * s / warmup
    if s >= warmup + decay:
        return valley
    return valley + (peak - valley) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / decay))


def chord(cfg, batch, logp, entropy, step):
    """SPEC 4.8 on a batch whose demos are the expert sequences."""
    v = View(batch)
    mu = chord_mu(step, cfg.mu_warmup_steps, cfg.mu_decay_steps, cfg.mu_peak, cfg.mu_valley)
    pg_rows = []
    for p in v.prompts():
        rolls = v.seqs(p, demo=False)
        advs = advantages_of_group([v.reward[s] for s in rolls], cfg.norm_adv_by_std, cfg.adv_eps)
        for s, a in zip(rolls, advs):
            pg_rows.append([pg_token(cfg, v, s, t, logp, entropy, a, cfg.kl_coef)[0] for t in v.tokens(s)])
    sft_rows = []
    for s in range(v.S):
        if v.demo[s]:
            row = []
            for t in v.tokens(s):
                prob = math.exp(float(logp[s, t].detach()))
                phi = prob * (1 - prob) if cfg.phi else sft_w(cfg, logp[s, t])
                lp = logp[s, t]
                if lp > math.log(cfg.cutoff_prob):
                    lp = ZERO + math.log(cfg.cutoff_prob)
                row.append(-phi * lp)
            sft_rows.append(row)
    sft = aggregate(sft_rows, "token_mean" if cfg.token_level_sft else "seq_mean_token_mean")
    return (1 - mu) * aggregate(pg_rows, cfg.loss_agg) + mu * sft, mu


