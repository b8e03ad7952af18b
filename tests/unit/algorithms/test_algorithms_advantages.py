"""SPEC 2 and 9: group advantages (plain, augmented, Dr. GRPO), the dynamic-sampling filter, against loops."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import algo_reference as ref
from megahybrid.algorithms.advantages import group_advantages, keep_groups

F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None)


def flatten(groups, demo_flags=None):
    """groups: list of reward lists -> (rewards [S], prompt ids [S] (sparse, interleaved order), member [S])."""
    rows = [(100 + 3 * i, r, True if demo_flags is None else demo_flags[i][j])
            for i, rs in enumerate(groups) for j, r in enumerate(rs)]
    rows = rows[::2] + rows[1::2]  # interleave the groups
    return (torch.tensor([r for _, r, _ in rows], dtype=F64), torch.tensor([p for p, _, _ in rows]),
            torch.tensor([m for _, _, m in rows]), rows)


def expected(rows, norm, eps=1e-6):
    """Reference advantages in row order, members only (0 otherwise)."""
    out = [0.0] * len(rows)
    for p in dict.fromkeys(p for p, _, _ in rows):
        idx = [i for i, (q, _, m) in enumerate(rows) if q == p and m]
        for i, a in zip(idx, ref.advantages_of_group([rows[i][1] for i in idx], norm, eps)):
            out[i] = a
    return out


rewards_st = st.lists(st.lists(st.sampled_from([0.0, 1.0, -1.0, 0.5, 0.25]) | st.floats(-3, 3), min_size=1,
                               max_size=6), min_size=1, max_size=5)


@SETTINGS
@given(groups=rewards_st, norm=st.booleans())
def test_group_advantages_match_loop_and_have_zero_mean(groups, norm):
    rewards, prompt, member, rows = flatten(groups)
    adv = group_advantages(rewards, prompt, member, norm_by_std=norm)
    torch.testing.assert_close(adv, torch.tensor(expected(rows, norm), dtype=F64), rtol=1e-9, atol=1e-9)
    for p in set(prompt.tolist()):
        sel = prompt == p
        group = rewards[sel]
        if bool((group == group[0]).all()):  # all equal, including a group of one: A = 0 exactly
            assert bool((adv[sel] == 0).all())
        else:
            assert abs(float(adv[sel].sum())) < 1e-9 * max(1.0, float(adv[sel].abs().max()))
            if norm and len(group) > 1 and float(group.std()) > 1e-3:
                # normalised: the advantages' unbiased std is std / (std + eps), i.e. ~1
                assert float(adv[sel].std()) == pytest.approx(1.0, abs=1e-3)


@SETTINGS
@given(groups=rewards_st, data=st.data())
def test_augmented_group_uses_only_members(groups, data):
    flags = [[data.draw(st.booleans()) for _ in g] for g in groups]
    rewards, prompt, member, rows = flatten(groups, flags)
    adv = group_advantages(rewards, prompt, member)
    torch.testing.assert_close(adv, torch.tensor(expected(rows, True), dtype=F64), rtol=1e-9, atol=1e-9)
    assert bool((adv[~member] == 0).all())


def test_known_values():
    rewards, prompt, member, _ = flatten([[1.0, 0.0, 0.0, 1.0], [0.3, 0.3, 0.3], [2.0]])
    adv = group_advantages(rewards, prompt, member)
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    got = {(int(p), float(r)): float(a) for p, r, a in zip(prompt, rewards, adv)}
    assert got[(100, 1.0)] == pytest.approx(0.5 / (std + 1e-6))
    assert got[(100, 0.0)] == pytest.approx(-0.5 / (std + 1e-6))
    assert got[(103, 0.3)] == 0.0 and got[(106, 2.0)] == 0.0


@SETTINGS
@given(groups=rewards_st, min_std=st.sampled_from([0.0, 1e-4, 0.3, 1.0]))
def test_keep_groups_matches_loop(groups, min_std):
    rewards, prompt, member, rows = flatten(groups)
    keep = keep_groups(rewards, prompt, member, min_std)
    for i, (p, _, _) in enumerate(rows):
        rs = [r for q, r, _ in rows if q == p]
        varied = len(rs) > 1 and any(r != rs[0] for r in rs)
        std = math.sqrt(sum((r - sum(rs) / len(rs)) ** 2 for r in rs) / (len(rs) - 1)) if len(rs) > 1 else 0.0
        if abs(std - min_std) > 1e-9:  # exactly at the threshold the two float computations may round apart
            assert bool(keep[i]) == (varied and std >= min_std), (rs, min_std)


def test_empty_batch():
    empty = torch.zeros(0, dtype=F64)
    assert group_advantages(empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)).numel() == 0
