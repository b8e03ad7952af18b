"""The Python half of scripts/gpu_smoke.sh: `python scripts/gpu_smoke_checks.py heads|engine WORKDIR`.

Each check prints exactly one line, `PASS <name>: <figures>` or `FAIL <name>: <why>`, and exits 0 / 1.
References are independent of the code under test: the float64 log-softmax of the materialised logits for the
LM heads, a Hugging Face forward pass of the same weights for the engine.
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))  # rollout_helpers: the tiny model and the HF log-prob reference


def report(name: str, ok: bool, text: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {text}", flush=True)
    return ok


def _head_case(num_tokens=4096, dim=1024, vocab=32768, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64) * dim ** -0.5
    targets = torch.randint(0, vocab, (num_tokens,), generator=g)
    return hidden, weight, targets


def _run_head(impl, hidden, weight, targets, dtype):
    """(logp, entropy, grad_h, grad_w, seconds of forward + backward) on the GPU."""
    from megahybrid.kernels import token_logprob_entropy

    h = hidden.detach().to("cuda", dtype).requires_grad_()
    w = weight.detach().to("cuda", dtype).requires_grad_()
    t = targets.cuda()
    for _ in range(2):  # the second run is timed (the first compiles Triton kernels / warms TE)
        h.grad = w.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = token_logprob_entropy(h, w, t, impl=impl)
        (out.logp.sum() + 0.1 * out.entropy.sum()).backward()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return out.logp.double().cpu(), out.entropy.double().cpu(), h.grad.double().cpu(), w.grad.double().cpu(), seconds


def _reference(hidden, weight, targets):
    """Materialised float64 logits on the GPU (seconds, not the minutes of a CPU float64 GEMM)."""
    h, w = hidden.detach().cuda().requires_grad_(), weight.detach().cuda().requires_grad_()
    logp_all = F.log_softmax(h @ w.T, dim=-1)
    logp = logp_all.gather(1, targets.cuda()[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    (logp.sum() + 0.1 * entropy.sum()).backward()
    return tuple(x.detach().cpu() for x in (logp, entropy, h.grad, w.grad))


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_heads(workdir: Path) -> bool:
    hidden, weight, targets = _head_case()
    ref = _reference(hidden, weight, targets)
    ok = True
    base = None
    for impl, dtype, tol in (("chunked", torch.float32, 1e-5), ("triton", torch.bfloat16, 2e-2),
                             ("te_fp8", torch.bfloat16, 6e-2)):
        name = f"head_{impl}_{str(dtype).split('.')[-1]}"
        try:
            logp, ent, gh, gw, seconds = _run_head(impl, hidden, weight, targets, dtype)
        except Exception as exc:  # noqa: BLE001 - each head reports on its own line
            ok = report(name, False, f"{type(exc).__name__}: {exc}".splitlines()[0]) and ok
            continue
        base = base or seconds
        errs = [_rel(logp, ref[0]), _rel(ent, ref[1]), _rel(gh, ref[2]), _rel(gw, ref[3])]
        good = max(errs) <= tol
        ok = report(name, good, f"rel err logp {errs[0]:.1e} entropy {errs[1]:.1e} grad_h {errs[2]:.1e} "
                                f"grad_w {errs[3]:.1e} (tol {tol:g}); fwd+bwd {seconds * 1e3:.1f} ms "
                                f"({base / seconds:.2f}x chunked fp32) at N=4096 D=1024 V=32768") and ok
    return ok


def check_engine(workdir: Path) -> bool:
    """CUDA vLLM engine on the tiny model; new weights by directory sync (reload_weights(weights_path=...));
    its sampled-token log-probs against a Hugging Face forward pass of the new weights."""
    from rollout_helpers import build_tiny, hf_logprobs, perturbed
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megahybrid.config.schema import RolloutConfig
    from megahybrid.rollout import RolloutPool, SamplingOptions, save_hf_weights

    model_dir = build_tiny(workdir)
    new = perturbed(load_file(str(Path(model_dir) / "model.safetensors")), seed=3)
    sync_dir = save_hf_weights(new, workdir / "sync")
    for extra in Path(model_dir).iterdir():  # the sync folder is a full HF folder (config + tokenizer)
        if not extra.name.endswith(".safetensors") and extra.is_file():
            (Path(sync_dir) / extra.name).write_bytes(extra.read_bytes())
    cfg = RolloutConfig(num_workers=1, gpus_per_worker=1, gpu_memory_utilization=0.3)
    prompts = [[10, 17, 11, 21], [11, 12, 13]]
    with RolloutPool(cfg, model_dir, seed=0, max_model_len=128, gpu_ids=[0], dtype="float32",
                     log_dir=str(workdir / "logs"), start_timeout_s=400) as pool:
        sync_s = pool.update_weights(str(sync_dir))
        res = pool.generate(prompts, 2, SamplingOptions(max_new_tokens=8, seed=1))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.load_state_dict(new, strict=False)
    err = max(abs(a - b) for p, samples in zip(prompts, res) for s in samples
              for a, b in zip(s.logprobs, hf_logprobs(model, p, s.token_ids)))
    return report("vllm_cuda_engine_dir_sync", err <= 1e-3,
                  f"max |engine - HF| log-prob {err:.1e} (tol 1e-3) after reload_weights(weights_path), "
                  f"sync {sync_s:.2f} s")


CHECKS = {"heads": check_heads, "engine": check_engine}

if __name__ == "__main__":
    which, workdir = sys.argv[1], Path(sys.argv[2])
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        sys.exit(0 if CHECKS[which](workdir) else 1)
    except Exception as exc:  # noqa: BLE001 - one FAIL line with the reason, the traceback after it
        report(which, False, f"{type(exc).__name__}: {exc}".splitlines()[0])
        traceback.print_exc()
        sys.exit(1)
