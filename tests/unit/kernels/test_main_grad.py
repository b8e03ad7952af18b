"""accumulate_into_main_grad (fused weight-gradient accumulation, Megatron's gradient_accumulation_fusion):
the backward adds the weight gradient into `weight.main_grad`; checked against the float64 reference's
autograd weight gradient plus the buffer's initial contents. Megatron DDP itself: tests/dist/test_kernels_tp.py."""
import pytest
import torch
from kernels_oracle import assert_rel, random_case

from megahybrid.kernels import token_logprob_entropy

OUTPUTS = ("logp", "entropy", "lse")


def _grads(case, seed=5, used=OUTPUTS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(case.targets.shape[0], generator=g, dtype=torch.float64) if name in used else None
            for name in OUTPUTS]


def _reference(case, grads):
    """float64 reference: (outputs, grad hidden, grad weight) by plain autograd through the naive op."""
    h = case.hidden.clone().requires_grad_()
    w = case.weight.clone().requires_grad_()
    out = token_logprob_entropy(h, w, case.targets, vocab_size=case.vocab_size, temperature=case.temperature,
                                impl="reference", accumulate_into_main_grad=False)
    _backward(out, grads)
    return out, h.grad, w.grad


def _backward(out, grads):
    sum((g * o.double()).sum() for g, o in zip(grads, (out.logp, out.entropy, out.lse)) if g is not None).backward()


def _fused_run(case, grads, impl, main_grad_dtype=torch.float32, repeats=1, **kw):
    """fp32 op with a preallocated, randomly filled weight.main_grad; -> (out, h.grad, w, initial main_grad)."""
    h = case.hidden.float().requires_grad_()
    w = case.weight.float().requires_grad_()
    w.main_grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(9)).to(main_grad_dtype)
    initial = w.main_grad.clone()
    for _ in range(repeats):  # micro-batches: gradients accumulate
        h.grad = None
        out = token_logprob_entropy(h, w, case.targets, vocab_size=case.vocab_size, temperature=case.temperature,
                                    impl=impl, chunk_size=case.chunk_size if impl == "chunked" else None, **kw)
        _backward(out, grads)
    return out, h.grad, w, initial


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("seed", range(4))
def test_main_grad_gets_reference_weight_grad(impl, seed):
    case = random_case(seed)
    grads = _grads(case, 300 + seed)
    want, want_h, want_w = _reference(case, grads)
    got, got_h, w, initial = _fused_run(case, grads, impl, accumulate_into_main_grad=True)
    assert w.grad is None, "the fused path must not also produce an autograd weight gradient"
    assert_rel(w.main_grad.double() - initial.double(), want_w, 1e-5, "main_grad - initial")
    assert torch.equal(w.main_grad[case.vocab_size:], initial[case.vocab_size:]), "padding rows must be untouched"
    assert_rel(got_h, want_h, 1e-5, "grad hidden")
    for name in OUTPUTS:
        assert_rel(getattr(got, name), getattr(want, name), 1e-5, name)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("used", OUTPUTS)
def test_main_grad_each_output_alone(used):
    """Entropy-only / logp-only / lse-only losses: the fused weight gradient of each term on its own."""
    case = random_case(7)
    grads = _grads(case, used=(used,))
    _, _, want_w = _reference(case, grads)
    _, _, w, initial = _fused_run(case, grads, "chunked")  # auto: the weight has a main_grad
    assert w.grad is None
    assert_rel(w.main_grad.double() - initial.double(), want_w, 1e-5, f"main_grad, {used} only")


@pytest.mark.timeout(60)
def test_main_grad_accumulates_over_micro_batches():
    case = random_case(3)
    grads = _grads(case)
    _, _, want_w = _reference(case, grads)
    _, _, w, initial = _fused_run(case, grads, "chunked", repeats=3)
    assert_rel(w.main_grad.double() - initial.double(), 3 * want_w, 1e-5, "main_grad after 3 backward passes")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-5), (torch.bfloat16, 2e-2)])
def test_main_grad_of_another_dtype(dtype, tol):
    """A main_grad whose dtype differs from the compute dtype (bf16 buffers without grad_reduce_in_fp32)."""
    case = random_case(5)
    grads = _grads(case)
    _, _, want_w = _reference(case, grads)
    _, _, w, initial = _fused_run(case, grads, "chunked", main_grad_dtype=dtype)
    assert w.main_grad.dtype == dtype
    added = w.main_grad.double() - initial.double()
    assert_rel(added, want_w, tol * (1 + initial.double().abs().max().item() / want_w.abs().max().item()),
               f"{dtype} main_grad")


@pytest.mark.timeout(60)
def test_auto_and_off():
    case = random_case(2)
    grads = _grads(case)
    _, _, want_w = _reference(case, grads)
    _, _, w, initial = _fused_run(case, grads, "chunked", accumulate_into_main_grad=False)
    assert torch.equal(w.main_grad, initial), "accumulate_into_main_grad=False must leave main_grad alone"
    assert_rel(w.grad, want_w, 1e-5, "weight.grad with accumulation off")


@pytest.mark.timeout(60)
def test_frozen_weight_leaves_main_grad_alone():
    case = random_case(4)
    w = case.weight.float()
    w.main_grad = torch.zeros_like(w)
    h = case.hidden.float().requires_grad_()
    out = token_logprob_entropy(h, w, case.targets, vocab_size=case.vocab_size)
    out.entropy.sum().backward()
    assert h.grad is not None and torch.count_nonzero(w.main_grad) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_megatron_flags(impl):
    """With Megatron DDP's `grad_added_to_main_grad` the backward sets it (the DDP hook then skips its add) and
    returns a dummy of the weight's shape (as Megatron's fused layers do); with `zero_out_wgrad` (tied embedding)
    it returns nothing, so the weight's other gradients reach the hook unchanged."""
    case = random_case(6)
    grads = _grads(case)
    _, _, want_w = _reference(case, grads)
    for zero_out in (False, True):
        h = case.hidden.float().requires_grad_()
        w = case.weight.float().requires_grad_()
        w.main_grad = torch.zeros_like(w)
        w.grad_added_to_main_grad = False
        w.zero_out_wgrad = zero_out
        out = token_logprob_entropy(h, w, case.targets, vocab_size=case.vocab_size, temperature=case.temperature,
                                    impl=impl)
        _backward(out, grads)
        assert w.grad_added_to_main_grad is True
        assert (w.grad is None) if zero_out else (w.grad is not None and w.grad.shape == w.shape)
        assert_rel(w.main_grad, want_w, 1e-5, f"main_grad (zero_out_wgrad={zero_out})")


@pytest.mark.timeout(60)
def test_main_grad_errors():
    h, w, targets = torch.randn(4, 3), torch.randn(8, 3, requires_grad=True), torch.tensor([0, 5, 7, 1])
    with pytest.raises(ValueError, match="no `main_grad`"):
        token_logprob_entropy(h, w, targets, accumulate_into_main_grad=True)
    w.main_grad = torch.zeros(8, 2)
    with pytest.raises(ValueError, match=r"main_grad must be a floating tensor shaped like the weight \(8, 3\)"):
        token_logprob_entropy(h, w, targets)
