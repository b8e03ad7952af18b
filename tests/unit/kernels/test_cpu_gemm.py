"""cpu_gemm (the chunked backend's block GEMMs): oneDNN and the torch fallback give the same products, and the
whole chunked op matches the float64 reference through either path (float32, plain grad and main_grad)."""
import pytest
import torch
from kernels_oracle import assert_rel, random_case, run_op

from megahybrid.kernels import cpu_gemm, token_logprob_entropy
from megahybrid.kernels.chunked import DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK

PATHS = [False] + ([True] if cpu_gemm.ONEDNN else [])  # True = oneDNN, where this build and CPU have it


@pytest.fixture(params=PATHS, ids=lambda p: "onednn" if p else "torch")
def gemm_path(request, monkeypatch):
    monkeypatch.setattr(cpu_gemm, "ONEDNN", request.param)
    return request.param


@pytest.mark.timeout(60)
def test_linear_and_linear_add_match_matmul(gemm_path):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 19, generator=g), torch.randn(23, 19, generator=g)
    want = x.double() @ w.double().T
    assert_rel(cpu_gemm.linear(x, w, out=torch.empty(37, 23)), want, 1e-6, "linear")
    # transposed (strided) operands, as the backward passes them: dz.T @ h and dz @ w
    y = torch.randn(37, 11, generator=g)
    assert_rel(cpu_gemm.linear(x.T, y.T, out=torch.empty(19, 11)), x.double().T @ y.double(), 1e-6, "x.T @ y")
    assert_rel(cpu_gemm.linear(x, y.T[:, :19], out=torch.empty(37, 11)), x.double() @ y.double()[:19], 1e-6,
               "x @ y[:19]")
    col = torch.randn(37, 1, generator=g)  # a per-row shift, like -lse
    got = cpu_gemm.linear_shift(x, w, col, out=torch.empty(37, 23))
    assert_rel(got, want + col.double(), 1e-6, "linear_shift")
    for dtype in (torch.float32, torch.bfloat16):  # main_grad buffers come in either
        acc = torch.randn(37, 23, generator=g).to(dtype)
        before = acc.double().clone()
        cpu_gemm.addmm_(acc, x, w)
        assert_rel(acc, before + want, 1e-6 if dtype == torch.float32 else 1e-2, f"addmm_ into {dtype}")


@pytest.mark.timeout(60)
def test_float64_and_empty_stay_on_torch():
    x, w = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    assert not cpu_gemm.uses_onednn(x)
    out = torch.empty(4, 5, dtype=torch.float64)
    assert cpu_gemm.linear(x, w, out=out) is out
    empty = cpu_gemm.linear(torch.randn(0, 3), torch.randn(5, 3), out=torch.empty(0, 5))
    assert empty.shape == (0, 5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(4))
def test_chunked_matches_reference_on_each_path(gemm_path, seed):
    case = random_case(seed)
    g = torch.Generator().manual_seed(300 + seed)
    grads = [torch.randn(case.targets.shape[0], generator=g, dtype=torch.float64) for _ in range(3)]
    want, want_h, want_w = run_op(token_logprob_entropy, case, torch.float64, grads, impl="reference")
    got, got_h, got_w = run_op(token_logprob_entropy, case, torch.float32, grads, impl="chunked",
                               chunk_size=case.chunk_size)
    for name in ("logp", "entropy", "lse"):
        assert_rel(getattr(got, name), getattr(want, name), 1e-5, name)
    assert_rel(got_h, want_h, 1e-5, "grad hidden")
    assert_rel(got_w, want_w, 1e-5, "grad weight")


@pytest.mark.timeout(60)
def test_main_grad_on_each_path_with_default_blocks(gemm_path):
    """Default blocks, several token and vocabulary blocks, a main_grad that already holds something."""
    g = torch.Generator().manual_seed(14)
    n, d, v = 2 * DEFAULT_TOKEN_CHUNK + 76, 8, DEFAULT_VOCAB_CHUNK + 188
    h64, w64 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(v, d, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=g)
    g_logp, g_ent = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    ref_h, ref_w = h64.clone().requires_grad_(), w64.clone().requires_grad_()
    ref = token_logprob_entropy(ref_h, ref_w, targets, temperature=0.8, impl="reference")
    ((ref.logp * g_logp).sum() + (ref.entropy * g_ent).sum()).backward()
    h, w = h64.float().requires_grad_(), w64.float().requires_grad_()
    w.main_grad = torch.randn(v, d, generator=g)
    initial = w.main_grad.double().clone()
    out = token_logprob_entropy(h, w, targets, temperature=0.8, impl="chunked")
    ((out.logp * g_logp.float()).sum() + (out.entropy * g_ent.float()).sum()).backward()
    assert w.grad is None
    assert_rel(h.grad, ref_h.grad, 1e-5, "grad hidden")
    assert_rel(w.main_grad.double() - initial, ref_w.grad, 1e-5, "main_grad increment")
