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
    check_main_grad_shard(op, hidden, weight[mine], targets, grads, want_w[mine], kw)


def check_main_grad_shard(op, hidden, shard, targets, grads, want_shard, kw):
    """accumulate_into_main_grad under TP: this rank's main_grad gets exactly its shard's gradient on top of what
    it held."""
    w = shard.float().requires_grad_()
    w.main_grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(dist.get_rank()))
    initial = w.main_grad.clone()
    out = op(hidden.float(), w, targets, accumulate_into_main_grad=True, **kw)
    sum((g * o).sum() for g, o in zip(grads, (out.logp, out.entropy, out.lse))).backward()
    assert w.grad is None, "fused accumulation must not also return a weight gradient"
    _assert_rel(w.main_grad - initial, want_shard, f"{kw['impl']} main_grad shard")


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


class _Head(torch.nn.Module):
    """One rank's LM-head shard used through the op, the way the policy's output layer is."""

    def __init__(self, shard: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(shard.float().clone())

    def forward(self, hidden, targets, **kw):
        from megahybrid.kernels import token_logprob_entropy

        return token_logprob_entropy(hidden, self.weight, targets, **kw)


def _ddp_run(shard, hidden, targets, grads, kw, overlap, accumulate, tied):
    """Megatron DDP (fp32 grad buffer) around the head; one forward/backward; -> (weight.main_grad, flag).
    tied: the weight also gets an ordinary autograd gradient (0.5 |W|^2 in the loss) and carries
    `zero_out_wgrad`, as Megatron marks an output layer tied to the input embedding on one stage."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=hidden.shape[1], num_attention_heads=1)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap,
                                               use_distributed_optimizer=False, average_in_collective=False)
    head = _Head(shard)
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=head)
    if tied:
        head.weight.zero_out_wgrad = True
    out = ddp(hidden.float(), targets, accumulate_into_main_grad=accumulate, **kw)
    loss = sum((g * o).sum() for g, o in zip(grads, (out.logp, out.entropy, out.lse)))
    if tied:
        loss = loss + 0.5 * (head.weight.double() ** 2).sum()
    loss.backward()
    ddp.finish_grad_sync()
    return head.weight.main_grad.clone(), head.weight.grad_added_to_main_grad


def check_megatron_ddp(rank, world, num_tokens=10, dim=6, vocab_size=21, rows=11, seed=4):
    """Real Megatron-Core DDP with TP = world: main_grad after backward equals the reference shard gradient once
    (the DDP hook must not add it a second time), fused (auto / with overlap_grad_reduce) or not."""
    from megatron.core import parallel_state

    from megahybrid.kernels import token_logprob_entropy as op

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world, create_gloo_process_groups=True)
    hidden, weight, targets, grads = _problem(num_tokens, dim, vocab_size, rows, world, seed)
    _, _, want_w = _run(op, hidden, weight, targets, grads, vocab_size=vocab_size, impl="reference")
    mine = weight[rank * rows:(rank + 1) * rows]
    kw = dict(vocab_start=rank * rows, vocab_size=vocab_size, chunk_size=4,
              tp_group=parallel_state.get_tensor_model_parallel_group())
    for overlap, accumulate, tied in [(False, None, False), (True, None, False), (False, False, False),
                                      (False, None, True), (True, True, True)]:
        main_grad, flag = _ddp_run(mine, hidden, targets, grads, kw, overlap, accumulate, tied)
        want = want_w[rank * rows:(rank + 1) * rows] + (mine if tied else 0.0)
        _assert_rel(main_grad, want, f"DDP main_grad (overlap={overlap}, accumulate={accumulate}, tied={tied})")
        assert flag == (accumulate is not False), "grad_added_to_main_grad must say whether we fused"
    parallel_state.destroy_model_parallel()


def megatron_ddp_worker(rank, world, init_file):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    from megahybrid.parallel import cpu_shim

    cpu_shim.apply()  # Megatron DDP's buffers ask for torch.cuda.current_device()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        check_megatron_ddp(rank, world)
    finally:
        dist.destroy_process_group()
