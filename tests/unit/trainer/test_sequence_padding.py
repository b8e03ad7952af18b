"""Defect 2 of issue 12: with sequence parallel (on for GPUs, model/spec.py) Megatron splits the sequence
dimension over the TP ranks and asserts that it divides (tensor_parallel/mappings.py); batches must be padded to
that multiple, and to 16 when the layers run FP8 GEMMs."""
from types import SimpleNamespace

import pytest

from megahybrid.config.schema import RunConfig
from megahybrid.model.spec import transformer_config
from megahybrid.training.batching import Group, Sequence, collate, length_multiple
from megahybrid.training.trainer import Trainer


@pytest.mark.parametrize("tp,sp,fp8,want", [(1, False, False, 1), (4, False, False, 1), (4, True, False, 4),
                                             (3, True, False, 3), (4, True, True, 16), (3, True, True, 48),
                                             (1, False, True, 16)])
def test_length_multiple(tp, sp, fp8, want):
    assert length_multiple(tensor_model_parallel_size=tp, sequence_parallel=sp, fp8=fp8) == want


def test_collate_pads_to_the_multiple_after_every_real_token():
    groups = [Group(0, "p", [1, 2], "a", [Sequence([1, 2], [5, 6, 7], False, 1.0, [-0.1, -0.2, -0.3]),
                                          Sequence([1, 2], [8], False, 0.0, [-0.5])])]
    b = collate(groups, prompt_offset=0, pad_id=0, length_multiple=4)
    assert b.tokens.tolist() == [[1, 2, 5, 6, 7, 0, 0, 0], [1, 2, 8, 0, 0, 0, 0, 0]]
    assert b.response_mask.sum(dim=1).tolist() == [3, 1] and not b.response_mask[:, 5:].any()
    assert collate(groups, prompt_offset=0, pad_id=0, length_multiple=5).tokens.shape == (2, 5)  # already a multiple


def test_trainer_pads_to_tp_when_the_gpu_config_turns_sequence_parallel_on():
    cfg = RunConfig()
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.sequence_parallel = 4, True
    cfg.model.num_attention_heads, cfg.model.num_query_groups = 8, 4
    tc = transformer_config(cfg.model, cfg.parallel, use_gpu=True)  # what a GPU rank builds
    assert tc.sequence_parallel
    fake = SimpleNamespace(policy=SimpleNamespace(transformer_config=tc))
    assert Trainer._length_multiple(fake) == 4
    cpu = SimpleNamespace(policy=SimpleNamespace(transformer_config=transformer_config(cfg.model, cfg.parallel,
                                                                                        use_gpu=False)))
    assert Trainer._length_multiple(cpu) == 1
