"""The same algorithm math on a CUDA device: CUDA float64 equals CPU float64, and statistics stay on the batch's
device (NCCL all-reduces CUDA tensors). Skipped without a GPU (tests/conftest.py)."""
import pytest
import torch

from algo_harness import grads, make_algo, make_batch, run_split

CASES = [("sft_kl", {}), ("grpo", {"kl_coef": 0.05, "tis_cap": 2.0, "clip_ratio_c": 3.0}),
         ("srft", {}), ("srft", {"entropy_scope": "token", "self_rollout_loss": "reinforce"}),
         ("superrl", {}), ("superrl", {"gate": "uncertainty"}), ("srl", {})]


def compare_devices(name, overrides, device):
    batch, logp, entropy = make_batch(seed=31)
    algo = make_algo(name, **overrides)
    plan = algo.plan(0)
    loss, shares, final, _ = run_split(algo, batch, logp, entropy, plan, ranks=2, micro=2)
    want = grads(loss, [logp, entropy, *algo.parameters()])
    dev_batch = batch.to(device=device)
    lp, ent = (x.detach().to(device).requires_grad_() for x in (logp, entropy))
    dev_loss, dev_shares, dev_final, dev_stats = run_split(algo, dev_batch, lp, ent, plan, ranks=2, micro=2)
    assert dev_loss.device.type == torch.device(device).type
    assert all(v.device.type == torch.device(device).type for v in dev_stats.values())
    assert float(dev_loss.detach()) == pytest.approx(float(loss.detach()), abs=1e-10)
    for got, ref in zip(grads(dev_loss, [lp, ent, *algo.parameters()]), want):
        torch.testing.assert_close(got.cpu(), ref.cpu(), rtol=0, atol=1e-10)
    assert dev_shares.keys() == shares.keys() and dev_final == pytest.approx(final)


@pytest.mark.gpu
@pytest.mark.parametrize("name,overrides", CASES)
def test_cuda_matches_cpu(name, overrides):
    compare_devices(name, overrides, "cuda")
