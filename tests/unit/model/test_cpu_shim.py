"""The CPU shim: each patched CUDA call site works only while it is applied; apply is idempotent; undo restores
the exact original objects; the context manager leaves an already-applied shim in place."""
import pytest
import torch

from megahybrid.parallel import cpu_shim

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is for machines without CUDA")


@pytest.fixture(autouse=True)
def _no_shim_leak():
    cpu_shim.undo()
    yield
    cpu_shim.undo()


def test_megatron_cuda_call_sites_fail_without_and_work_with_the_shim():
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.utils import get_default_causal_mask

    with pytest.raises((AssertionError, RuntimeError)):
        get_default_causal_mask(7)
    with cpu_shim.cpu_shim():
        mask = get_default_causal_mask(7)  # a `device="cuda"` literal inside Megatron
        assert mask.device.type == "cpu" and torch.equal(mask, torch.ones(7, 7).triu(1).bool())
        assert torch.cuda.current_device() == torch.device("cpu")
        torch.cuda.synchronize()
        x = torch.zeros(3)
        assert x.cuda() is x
        assert x.to("cuda:0").device.type == "cpu"
        assert x.type() == "torch.cuda.FloatTensor"  # what Megatron's grad-clip / optimizer asserts expect
        assert x.type(torch.float64).dtype == torch.float64  # conversions are untouched
        torch.manual_seed(3)
        state = mp_random._get_cuda_rng_state()
        first = torch.rand(2)
        mp_random._set_cuda_rng_state(state)
        assert torch.equal(torch.rand(2), first)  # activation recompute restores the CPU generator
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(2, device="cuda")


def test_apply_is_idempotent_and_undo_restores_originals():
    from megatron.core.tensor_parallel import random as mp_random

    originals = (torch.cuda.current_device, torch.cuda.synchronize, mp_random._get_cuda_rng_state,
                 mp_random._set_cuda_rng_state)
    cpu_shim.apply()
    cpu_shim.apply()
    assert cpu_shim.is_applied()
    assert torch.zeros(1, device="cuda").device.type == "cpu"
    cpu_shim.undo()
    assert not cpu_shim.is_applied()
    assert (torch.cuda.current_device, torch.cuda.synchronize, mp_random._get_cuda_rng_state,
            mp_random._set_cuda_rng_state) == originals
    assert torch.zeros(1).type() == "torch.FloatTensor"
    cpu_shim.undo()  # a second undo is a no-op


def test_context_manager_keeps_a_shim_applied_before_it():
    cpu_shim.apply()
    with cpu_shim.cpu_shim():
        assert cpu_shim.is_applied()
    assert cpu_shim.is_applied()
    cpu_shim.undo()
    with cpu_shim.cpu_shim():
        assert cpu_shim.is_applied()
    assert not cpu_shim.is_applied()


def test_apply_if_needed_applies_without_cuda():
    assert cpu_shim.apply_if_needed() is True
    assert cpu_shim.is_applied()
