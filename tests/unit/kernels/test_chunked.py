"""impl='chunked' (the CPU default) against the float64 reference: values and gradients to 1e-5 relative."""
import pytest
import torch
from kernels_oracle import assert_rel, loop_oracle, random_case, run_op

from megahybrid.kernels import token_logprob_entropy

OUTPUTS = ("logp", "entropy", "lse")


def _compare(case, grads, dtype, tol, **kw):
    want, want_h, want_w = run_op(token_logprob_entropy, case, torch.float64, grads, impl="reference")
    got, got_h, got_w = run_op(token_logprob_entropy, case, dtype, grads, impl="chunked",
                               chunk_size=case.chunk_size, **kw)
    for name in OUTPUTS:
        assert_rel(getattr(got, name), getattr(want, name), tol, name)
    assert_rel(got_h, want_h, tol, "grad hidden")
    assert_rel(got_w, want_w, tol, "grad weight")
    assert torch.count_nonzero(got_w[case.vocab_size:]) == 0, "padding rows must get no gradient"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(12))
def test_chunked_fp32_matches_reference(seed):
    case = random_case(seed)
    g = torch.Generator().manual_seed(200 + seed)
    grads = [torch.randn(case.targets.shape[0], generator=g, dtype=torch.float64) for _ in range(3)]
    _compare(case, grads, torch.float32, 1e-5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("used", ["logp", "entropy", "lse"])
def test_each_output_gradient_alone(used):
    """Entropy's gradient is checked apart from logp's: only one output feeds the loss."""
    case = random_case(7)
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(case.targets.shape[0], generator=g, dtype=torch.float64) if name == used else None
             for name in OUTPUTS]
    _compare(case, grads, torch.float32, 1e-5)


@pytest.mark.timeout(60)
def test_chunked_fp64_matches_loop_formulas_tightly():
    case = random_case(4, max_tokens=8, max_dim=5, max_vocab=11)
    grads = [torch.linspace(-1, 1, case.targets.shape[0], dtype=torch.float64) * k for k in (1.0, 0.5, -0.3)]
    got, gh, gw = run_op(token_logprob_entropy, case, torch.float64, grads, impl="chunked",
                         chunk_size=case.chunk_size)
    want = loop_oracle(case.hidden, case.weight, case.targets, case.vocab_size, case.temperature, *grads)
    for name in OUTPUTS:
        assert_rel(getattr(got, name), want[name], 1e-12, name)
    assert_rel(gh, want["grad_hidden"], 1e-12, "grad hidden")
    assert_rel(gw, want["grad_weight"], 1e-12, "grad weight")


@pytest.mark.timeout(60)
def test_chunked_gradcheck_finite_differences():
    case = random_case(2, max_tokens=5, max_dim=4, max_vocab=9)
    h, w = case.hidden.clone().requires_grad_(), case.weight.clone().requires_grad_()

    def fn(h, w):
        out = token_logprob_entropy(h, w, case.targets, vocab_size=case.vocab_size,
                                    temperature=case.temperature, chunk_size=3)
        return out.logp, out.entropy, out.lse

    assert torch.autograd.gradcheck(fn, (h, w))


@pytest.mark.timeout(60)
def test_large_logits_stay_finite_and_exact():
    case = random_case(9)
    case.hidden = case.hidden * 40.0  # logits in the hundreds: exp overflows without the max shift
    grads = [torch.ones(case.targets.shape[0], dtype=torch.float64)] * 3
    _compare(case, grads, torch.float32, 1e-5)


@pytest.mark.timeout(60)
def test_frozen_weight_and_no_grad():
    case = random_case(11)
    h = case.hidden.float().requires_grad_()
    out = token_logprob_entropy(h, case.weight.float(), case.targets, vocab_size=case.vocab_size, chunk_size=4)
    out.entropy.sum().backward()
    ref_h = case.hidden.clone().requires_grad_()
    ref = token_logprob_entropy(ref_h, case.weight, case.targets, vocab_size=case.vocab_size, impl="reference")
    ref.entropy.sum().backward()
    assert_rel(h.grad, ref_h.grad, 1e-5, "grad hidden, frozen weight")
    with torch.no_grad():
        out = token_logprob_entropy(case.hidden.float(), case.weight.float(), case.targets,
                                    vocab_size=case.vocab_size)
    assert out.logp.grad_fn is None
    assert_rel(out.logp, ref.logp, 1e-5, "logp under no_grad")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kwargs, match", [
    (dict(impl="fused"), "reference, chunked, triton, te_fp8"),
    (dict(vocab_size=3), "vocab_size=3"),
    (dict(temperature=0.0), "temperature"),
    (dict(vocab_start=4), "vocab_start=4 without a tp_group"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    h, w = torch.randn(4, 3), torch.randn(8, 3)
    targets = torch.tensor([0, 5, 7, 1])
    with pytest.raises(ValueError, match=match):
        token_logprob_entropy(h, w, targets, **kwargs)


@pytest.mark.timeout(60)
def test_shape_and_target_errors():
    with pytest.raises(ValueError, match="shape mismatch"):
        token_logprob_entropy(torch.randn(4, 3), torch.randn(8, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_logprob_entropy(torch.randn(2, 3), torch.randn(8, 3), torch.tensor([1, 8]))
    with pytest.raises(ValueError, match=">= 0"):
        token_logprob_entropy(torch.randn(2, 3), torch.randn(8, 3), torch.tensor([1, -100]))


@pytest.mark.timeout(60)
def test_default_blocks_with_more_tokens_than_a_block():
    """chunk_size=None (the tuned default blocks) with N past one token block and V past one vocabulary block."""
    from megahybrid.kernels.chunked import DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK

    g = torch.Generator().manual_seed(12)
    case = random_case(12)
    n, v = 2 * DEFAULT_TOKEN_CHUNK + 76, DEFAULT_VOCAB_CHUNK + 188  # a partial last block on both axes
    case.hidden = torch.randn(n, 8, generator=g, dtype=torch.float64)
    case.weight = torch.randn(v, 8, generator=g, dtype=torch.float64)
    case.targets = torch.randint(0, v - 10, (n,), generator=g)
    case.vocab_size, case.chunk_size = v - 10, None
    grads = [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(3)]
    _compare(case, grads, torch.float32, 1e-5)
