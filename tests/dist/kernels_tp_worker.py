"""Worker for tests/dist/test_kernels_tp.py: one gloo rank holding one vocabulary shard of the LM head.

Every rank builds the same full problem from a fixed seed, computes the TP=1 float64 reference itself, then runs
the op on its shard with tp_group and checks values, the full hidden gradient and its own weight-shard gradient.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

TOL = 1e-5


def _assert_rel(actual, expected, what):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= TOL * max(scale, 1e-12), f"rank {dist.get_rank()} {what}: error {err:.3e} vs scale {scale:.3e}"


def _problem(num_tokens, dim, vocab_size, rows, world, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(rows * world, dim, generator=g, dtype=torch.float64)  # padded rows at the end
    targets = torch.randint(0, vocab_size, (num_tokens,), generator=g)
    grads = [torch.randn(num_tokens, generator=g, dtype=torch.float64) for _ in range(3)]
    return hidden, weight, targets, grads


def _run(op, hidden, weight, targets, grads, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = op(h, w, targets, **kw)
    sum((g * o).sum() for g, o in zip(grads, (out.logp, out.entropy, out.lse))).backward()
    return out, h.grad, w.grad


def check_shard(rank, world, impl, num_tokens, dim, vocab_size, rows, temperature, chunk_size, seed):
    from megahybrid.kernels import token_logprob_entropy as op

    hidden, weight, targets, grads = _problem(num_tokens, dim, vocab_size, rows, world, seed)
    want, want_h, want_w = _run(op, hidden, weight, targets, grads, vocab_size=vocab_size,
                                temperature=temperature, impl="reference")
    mine = slice(rank * rows, (rank + 1) * rows)
    kw = dict(vocab_start=rank * rows, vocab_size=vocab_size, temperature=temperature, impl=impl,
              tp_group=dist.group.WORLD, chunk_size=chunk_size)
    for reduce_hidden_grad in (True, False):
        got, got_h, got_w = _run(op, hidden.float(), weight[mine].float(), targets, grads,
                                 reduce_hidden_grad=reduce_hidden_grad, **kw)
        for name in ("logp", "entropy", "lse"):
            _assert_rel(getattr(got, name), getattr(want, name), f"{impl} {name}")
        if not reduce_hidden_grad:  # the caller's job then: summing the partial gradients
            dist.all_reduce(got_h)
        _assert_rel(got_h, want_h, f"{impl} grad hidden (reduce_hidden_grad={reduce_hidden_grad})")
        _assert_rel(got_w, want_w[mine], f"{impl} grad weight shard")


def check_missing_target(rank, world, impl):
    """A target id beyond every shard (vocab_size not given) must raise on every rank, not return garbage."""
    from megahybrid.kernels import token_logprob_entropy as op

    weight = torch.randn(3, 4)
    targets = torch.tensor([0, 3 * world])
    try:
        op(torch.randn(2, 4), weight, targets, vocab_start=3 * rank, tp_group=dist.group.WORLD, impl=impl)
    except ValueError as err:
        assert "in no rank's vocabulary shard" in str(err), str(err)
    else:
        raise AssertionError("a target outside every shard was accepted")


def worker(rank, world, init_file, impls, cases):
    os.environ["OMP_NUM_THREADS"] = "1"
    if "triton" in impls:  # Triton's CPU interpreter; must precede the first import of the kernels
        os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for impl in impls:
            for case in cases:
                check_shard(rank, world, impl, **case)
        check_missing_target(rank, world, "chunked")
    finally:
        dist.destroy_process_group()
