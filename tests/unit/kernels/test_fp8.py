"""impl='te_fp8': the Transformer Engine FP8 LM-head path. On CPU it must refuse clearly; on an FP8-capable GPU
with Transformer Engine it must agree with the float64 reference to FP8 accuracy (and visibly not be fp32)."""
import pytest
import torch
import torch.nn.functional as F

from megahybrid.kernels import token_logprob_entropy


@pytest.mark.timeout(60)
def test_te_fp8_on_cpu_names_what_is_missing():
    h, w = torch.randn(4, 16), torch.randn(32, 16)
    with pytest.raises(RuntimeError, match=r"impl='te_fp8'.*CUDA"):
        token_logprob_entropy(h, w, torch.tensor([0, 3, 31, 7]), impl="te_fp8")


def _fp8_ready():
    te = pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")
    from megahybrid.kernels.fp8 import _fp8_available

    ok, reason = _fp8_available(te)
    if not ok:
        pytest.skip(f"this GPU has no FP8 support: {reason}")


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_te_fp8_matches_reference_to_fp8_accuracy():
    _fp8_ready()
    g = torch.Generator().manual_seed(0)
    num_tokens, dim, rows, vocab_size = 100, 256, 1024, 1000  # 100 tokens: not a multiple of 16
    hidden = torch.randn(num_tokens, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(rows, dim, generator=g, dtype=torch.float64) * dim ** -0.5
    targets = torch.randint(0, vocab_size, (num_tokens,), generator=g)
    grads = [torch.randn(num_tokens, generator=g, dtype=torch.float64) for _ in range(3)]

    def run(impl, dtype, device):
        h = hidden.to(device, dtype).requires_grad_()
        w = weight.to(device, dtype).requires_grad_()
        out = token_logprob_entropy(h, w, targets.to(device), vocab_size=vocab_size, temperature=0.8, impl=impl,
                                    chunk_size=48 if impl == "te_fp8" else None)
        loss = sum((gr.to(device, o.dtype) * o).sum() for gr, o in zip(grads, (out.logp, out.entropy, out.lse)))
        loss.backward()
        return [x.detach().double().cpu() for x in (out.logp, out.entropy, out.lse, h.grad, w.grad)]

    want = run("reference", torch.float64, "cpu")
    got = run("te_fp8", torch.bfloat16, "cuda")
    for name, a, b in zip(("logp", "entropy", "lse", "grad hidden", "grad weight"), got, want):
        rel = (a - b).abs().max() / b.abs().max()
        assert rel < 0.1, f"{name}: relative error {rel:.3g} beyond FP8 accuracy"
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99, name
    assert torch.count_nonzero(got[4][vocab_size:]) == 0, "padding rows must get no gradient"
    assert (got[0] - want[0]).abs().max() > 1e-6, "te_fp8 agrees to fp32 precision: the FP8 GEMM did not run"


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_te_fp8_accumulates_into_main_grad():
    """accumulate_into_main_grad on the FP8 path adds what the unfused FP8 path returns as weight.grad."""
    _fp8_ready()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(64, 128, generator=g).cuda().bfloat16()
    weight = (torch.randn(256, 128, generator=g) * 128 ** -0.5).cuda().bfloat16()
    targets = torch.randint(0, 256, (64,), generator=g).cuda()

    def run(fused):
        w = weight.clone().requires_grad_()
        if fused:
            w.main_grad = torch.ones(w.shape, device="cuda")
        out = token_logprob_entropy(hidden, w, targets, impl="te_fp8", accumulate_into_main_grad=fused)
        (out.logp.sum() + out.entropy.sum()).backward()
        return w

    plain, fused = run(False), run(True)
    assert fused.grad is None
    added = fused.main_grad - 1.0
    rel = (added - plain.grad.float()).abs().max() / plain.grad.float().abs().max()
    assert rel < 1e-2, f"fused FP8 weight gradient differs from the unfused one by {rel:.3g}"
