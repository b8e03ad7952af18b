"""The extra-phase optimizer state of a checkpoint (training/extra_phase.py): each rank's file round-trips, and a
resume with another parallel layout is refused with a message instead of loading a foreign shard."""
import types

import pytest
import torch

from megahybrid.config.schema import RunConfig
from megahybrid.training.extra_phase import ExtraPhaseRunner


def runner(rank=0, world=2, tp=1):
    cfg = RunConfig()
    cfg.parallel.tensor_model_parallel_size = tp
    trainer = types.SimpleNamespace(ps=types.SimpleNamespace(rank=rank, world_size=world), cfg=cfg)
    return ExtraPhaseRunner(trainer)


def test_state_round_trips_per_rank_and_checks_the_layout(tmp_path):
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(4.0)}}, "param_groups": [{"lr": 1e-6}]}
    a = runner(rank=1)
    a.pending = {"relift_sft": state}
    a.save(tmp_path)
    assert (tmp_path / "megahybrid_extra_optimizers_rank00001.pt").is_file()
    b = runner(rank=1)
    b.load(tmp_path)
    torch.testing.assert_close(b.pending["relift_sft"]["state"][0]["exp_avg"], torch.arange(4.0))
    runner(rank=0).load(tmp_path)  # rank 0 saved nothing: nothing to load, no error
    with pytest.raises(RuntimeError, match="same parallel layout"):
        runner(rank=1, tp=2).load(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    runner().save(empty)  # no phase ran yet: no file
    assert not list(empty.iterdir())
