"""The oracle itself: impl='reference' against explicit-loop float64 formulas and F.cross_entropy."""
import pytest
import torch
import torch.nn.functional as F
from kernels_oracle import assert_rel, loop_oracle, random_case, run_op

from megahybrid.kernels import token_logprob_entropy


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(6))
def test_reference_matches_loop_formulas(seed):
    case = random_case(seed, max_tokens=9, max_dim=6, max_vocab=13)
    g = torch.Generator().manual_seed(100 + seed)
    grads = [torch.randn(case.targets.shape[0], generator=g, dtype=torch.float64) for _ in range(3)]
    out, gh, gw = run_op(token_logprob_entropy, case, torch.float64, grads, impl="reference")
    want = loop_oracle(case.hidden, case.weight, case.targets, case.vocab_size, case.temperature, *grads)
    for name in ("logp", "entropy", "lse"):
        assert_rel(getattr(out, name), want[name], 1e-12, name)
    assert_rel(gh, want["grad_hidden"], 1e-12, "grad hidden")
    assert_rel(gw, want["grad_weight"], 1e-12, "grad weight")
    assert torch.count_nonzero(gw[case.vocab_size:]) == 0, "padding rows must get no gradient"


@pytest.mark.timeout(60)
def test_reference_logp_equals_cross_entropy():
    case = random_case(3)
    logits = case.hidden @ case.weight[: case.vocab_size].T / case.temperature
    out = token_logprob_entropy(case.hidden, case.weight, case.targets, vocab_size=case.vocab_size,
                                temperature=case.temperature, impl="reference")
    assert_rel(out.logp, -F.cross_entropy(logits, case.targets, reduction="none"), 1e-12, "logp")
