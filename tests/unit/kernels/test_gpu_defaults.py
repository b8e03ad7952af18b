"""Issue 12, defect 7: the LM-head default on GPUs is the fused Triton path (bf16 operands as they are, fp32
accumulation and outputs), not the fp32 chunked GEMMs; on CPU it stays chunked. The TE-FP8 head reuses one
te.Linear per shape instead of building one per call."""
import pytest
import torch
import torch.nn.functional as F

from megahybrid.config.schema import RunConfig
from megahybrid.kernels import default_impl, token_logprob_entropy


def test_auto_is_the_config_default_and_picks_by_device():
    assert RunConfig().model.logprob_impl == "auto"
    assert default_impl(torch.device("cpu"), torch.float32) == "chunked"
    pytest.importorskip("triton", reason="the `triton` package (cpu extra) is not installed")
    assert default_impl(torch.device("cuda", 0), torch.bfloat16) == "triton"
    assert default_impl(torch.device("cuda", 0), torch.float32) == "triton"
    assert default_impl(torch.device("cuda", 0), torch.float64) == "chunked"  # triton computes in fp32


def test_auto_on_cpu_is_chunked_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(9, 8, generator=g), torch.randn(21, 8, generator=g)
    targets = torch.randint(0, 21, (9,), generator=g)
    auto = token_logprob_entropy(h, w, targets, temperature=0.9)
    chunked = token_logprob_entropy(h, w, targets, temperature=0.9, impl="chunked")
    assert torch.equal(auto.logp, chunked.logp) and torch.equal(auto.entropy, chunked.entropy)


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_auto_on_cuda_reads_bf16_and_returns_fp32_close_to_float64():
    g = torch.Generator().manual_seed(1)
    h64, w64 = torch.randn(300, 256, generator=g, dtype=torch.float64), torch.randn(1000, 256, generator=g,
                                                                                     dtype=torch.float64) / 16
    targets = torch.randint(0, 1000, (300,), generator=g)
    h, w = h64.to("cuda", torch.bfloat16), w64.to("cuda", torch.bfloat16)
    out = token_logprob_entropy(h, w, targets.cuda())
    assert out.logp.dtype == torch.float32 and out.entropy.dtype == torch.float32
    # reference: float64 on the same bf16-rounded operands
    logits = h.double().cpu() @ w.double().cpu().T
    ref = F.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    assert (out.logp.cpu().double() - ref).abs().max() < 1e-3


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_te_fp8_builds_one_te_linear_per_shape():
    te = pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")
    from megahybrid.kernels import fp8

    ok, reason = fp8._fp8_available(te)
    if not ok:
        pytest.skip(f"this GPU has no FP8 support: {reason}")
    fp8._te_linear.cache_clear()
    h = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, 256, (64,), device="cuda")
    for seed in range(3):  # three heads of one shape (e.g. policy and reference): one module
        torch.manual_seed(seed)
        w = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
        token_logprob_entropy(h, w, targets, impl="te_fp8")
    info = fp8._te_linear.cache_info()
    assert (info.currsize, info.misses) == (1, 1), info
