"""Trainer plumbing without engines: batch layout, equal-shape micro-batches, prompt order, group filtering."""
import torch

from megahybrid.training.batching import Group, Sequence, collate, micro_batches, shard_groups
from megahybrid.training.generation import filter_groups, light_batch
from megahybrid.training.sampler import PromptSampler


def make_groups():
    g0 = Group(0, "p0", [1, 2], "3", [Sequence([1, 2], [5, 6, 7], False, 1.0, [-0.1, -0.2, -0.3], "stop"),
                                      Sequence([1, 2], [8], False, 0.0, [-0.5], "length"),
                                      Sequence([1, 2], [9, 9, 2], True, 1.0)])
    g1 = Group(4, "p1", [3], "4", [Sequence([3], [4, 4], False, 0.0, [-1.0, -2.0], "stop")])
    return [g0, g1]


def test_collate_aligns_tokens_masks_and_engine_logp():
    b = collate(make_groups(), prompt_offset=10, pad_id=0)
    assert b.tokens.tolist() == [[1, 2, 5, 6, 7], [1, 2, 8, 0, 0], [1, 2, 9, 9, 2], [3, 4, 4, 0, 0]]
    assert b.response_mask.tolist() == [[False, False, True, True, True], [False, False, True, False, False],
                                        [False, False, True, True, True], [False, True, True, False, False]]
    assert b.prompt_index.tolist() == [10, 10, 10, 11]
    assert b.is_demo.tolist() == [False, False, True, False]
    assert b.rewards.tolist() == [1.0, 0.0, 1.0, 0.0]
    torch.testing.assert_close(b.engine_logp[0], torch.tensor([0, 0, -0.1, -0.2, -0.3]))
    torch.testing.assert_close(b.engine_logp[3], torch.tensor([0, -1.0, -2.0, 0, 0]))
    assert b.engine_logp[2].abs().sum() == 0  # demos have no engine log-probs


def test_micro_batches_have_equal_shapes_and_padding_contributes_nothing():
    b = collate(make_groups(), prompt_offset=0, pad_id=0)
    b.fields["adv"] = torch.tensor([0.5, -0.5, 1.0, 0.0])
    mbs = micro_batches(b, 3, 2, pad_id=0)
    assert [mb.tokens.shape for mb in mbs] == [torch.Size([3, 5])] * 2
    pad = mbs[1].select(slice(1, 3))
    assert not pad.response_mask.any() and (pad.prompt_index == -1).all() and (pad.fields["adv"] == 0).all()
    assert torch.equal(torch.cat([mbs[0].tokens, mbs[1].tokens[:1]]), b.tokens)


def test_shard_groups_keeps_whole_groups_and_offsets():
    groups = list(range(7))
    shards = [shard_groups(groups, r, 3) for r in range(3)]
    assert shards == [([0, 1, 2], 0), ([3, 4, 5], 3), ([6], 6)]


def test_prompt_sampler_is_deterministic_and_resumable():
    a = PromptSampler(10, seed=3)
    first = a.take(25)
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))  # epochs
    b = PromptSampler(10, seed=3)
    b.take(7)
    c = PromptSampler(10, seed=3)
    c.load_state_dict(b.state_dict())
    assert c.take(18) == first[7:25]
    assert PromptSampler(10, seed=4).take(10) != first[:10]


def test_filter_groups_drops_filtered_rollouts_and_empty_groups():
    groups = make_groups()
    lb = light_batch(groups)
    assert lb.prompt_index.tolist() == [0, 0, 0, 1]
    kept = filter_groups(groups, torch.tensor([True, True, True, False]))
    assert [g.example_index for g in kept] == [0] and len(kept[0].sequences) == 3
