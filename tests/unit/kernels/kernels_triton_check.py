"""Subprocess helper of test_triton_interpret.py: Triton's interpreter must be switched on before triton.jit
decorates the kernels, so this runs in a fresh interpreter. Prints one JSON line of max relative errors
(triton fp32 vs the float64 reference) per case, or, with `--no-interpret`, the error raised on CPU tensors."""
import json
import os
import sys

if "--no-interpret" not in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from kernels_oracle import Case, random_case, run_op  # noqa: E402

from megahybrid.kernels import token_logprob_entropy  # noqa: E402


def rel(a, b):
    if a is None or b is None:
        return None if a is b else float("inf")
    scale = b.double().abs().max().item()
    return (a.double() - b.double()).abs().max().item() / max(scale, 1e-12)


def compare(case: Case, used=("logp", "entropy", "lse"), frozen_weight=False):
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(case.targets.shape[0], generator=g, dtype=torch.float64) if name in used else None
             for name in ("logp", "entropy", "lse")]
    want, want_h, want_w = run_op(token_logprob_entropy, case, torch.float64, grads, impl="reference")
    if frozen_weight:
        h = case.hidden.float().requires_grad_()
        got = token_logprob_entropy(h, case.weight.float(), case.targets, vocab_size=case.vocab_size,
                                    temperature=case.temperature, impl="triton")
        sum((g * o).sum() for g, o in zip(grads, (got.logp, got.entropy, got.lse)) if g is not None).backward()
        got_h, got_w, want_w = h.grad, None, None
    else:
        got, got_h, got_w = run_op(token_logprob_entropy, case, torch.float32, grads, impl="triton")
    return dict(logp=rel(got.logp, want.logp), entropy=rel(got.entropy, want.entropy), lse=rel(got.lse, want.lse),
                grad_hidden=rel(got_h, want_h), grad_weight=rel(got_w, want_w))


def compare_main_grad(case: Case):
    """accumulate_into_main_grad: the kernel's atomic adds go straight into an fp32 weight.main_grad."""
    g = torch.Generator().manual_seed(8)
    grads = [torch.randn(case.targets.shape[0], generator=g, dtype=torch.float64) for _ in range(3)]
    _, _, want_w = run_op(token_logprob_entropy, case, torch.float64, grads, impl="reference")
    w = case.weight.float().requires_grad_()
    w.main_grad = torch.randn(w.shape, generator=g)
    initial = w.main_grad.clone()
    got = token_logprob_entropy(case.hidden.float(), w, case.targets, vocab_size=case.vocab_size,
                                temperature=case.temperature, impl="triton", accumulate_into_main_grad=True)
    sum((g * o).sum() for g, o in zip(grads, (got.logp, got.entropy, got.lse))).backward()
    return dict(main_grad=rel(w.main_grad - initial, want_w), weight_grad_is_none=w.grad is None)


def main():
    if "--no-interpret" in sys.argv:
        try:
            token_logprob_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4]), impl="triton")
        except RuntimeError as err:
            print(json.dumps({"error": str(err)}))
        else:
            print(json.dumps({"error": None}))
        return
    # Shapes straddle the 64-wide blocks: tokens and vocabulary rows not multiples of them, padded rows.
    g = torch.Generator().manual_seed(3)
    big = Case(hidden=torch.randn(70, 72, generator=g, dtype=torch.float64) * 0.5,
               weight=torch.randn(133, 72, generator=g, dtype=torch.float64),
               targets=torch.randint(0, 129, (70,), generator=g), vocab_size=129, temperature=0.7, chunk_size=None)
    small = random_case(5, max_tokens=20, max_dim=12, max_vocab=30)
    results = {
        "all_outputs": compare(big),
        "small_random": compare(small),
        "entropy_only": compare(small, used=("entropy",)),
        "logp_only": compare(small, used=("logp",)),
        "frozen_weight": compare(small, frozen_weight=True),
        "main_grad": compare_main_grad(small),
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
