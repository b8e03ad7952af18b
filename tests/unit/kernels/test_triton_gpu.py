"""impl='triton' compiled for a CUDA GPU (the interpreter test covers CPU): values and gradients vs the float64
reference, fp32 inputs (ieee dots, no TF32) to 1e-5."""
import pytest
import torch
from kernels_oracle import assert_rel, random_case, run_op

from megahybrid.kernels import token_logprob_entropy


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", range(4))
def test_triton_cuda_matches_reference(seed):
    pytest.importorskip("triton")
    case = random_case(seed, max_tokens=300, max_dim=200, max_vocab=700)
    grads = [torch.randn(case.targets.shape[0], dtype=torch.float64) for _ in range(3)]
    want, want_h, want_w = run_op(token_logprob_entropy, case, torch.float64, grads, impl="reference")
    cuda = type(case)(hidden=case.hidden.cuda(), weight=case.weight.cuda(), targets=case.targets.cuda(),
                      vocab_size=case.vocab_size, temperature=case.temperature, chunk_size=None)
    got, got_h, got_w = run_op(token_logprob_entropy, cuda, torch.float32, [g.cuda() for g in grads],
                               impl="triton")
    for name in ("logp", "entropy", "lse"):
        assert_rel(getattr(got, name).cpu(), getattr(want, name), 1e-5, name)
    assert_rel(got_h.cpu(), want_h, 1e-5, "grad hidden")
    assert_rel(got_w.cpu(), want_w, 1e-5, "grad weight")


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_triton_cuda_accumulates_into_main_grad():
    pytest.importorskip("triton")
    case = random_case(1, max_tokens=300, max_dim=200, max_vocab=700)
    grads = [torch.randn(case.targets.shape[0], dtype=torch.float64) for _ in range(3)]
    _, _, want_w = run_op(token_logprob_entropy, case, torch.float64, grads, impl="reference")
    w = case.weight.float().cuda().requires_grad_()
    w.main_grad = torch.randn(w.shape, device="cuda")
    initial = w.main_grad.clone()
    out = token_logprob_entropy(case.hidden.float().cuda(), w, case.targets.cuda(), vocab_size=case.vocab_size,
                                temperature=case.temperature, impl="triton")  # auto: w has a main_grad
    sum((g.cuda() * o).sum() for g, o in zip(grads, (out.logp, out.entropy, out.lse))).backward()
    assert w.grad is None
    assert_rel((w.main_grad - initial).cpu(), want_w, 1e-5, "main_grad - initial")
