"""The naive, readable oracle: full `[N, V]` logits and log_softmax, gradients by plain autograd.

Under TP it all-gathers the vocabulary shards and computes the whole vocabulary on every rank.
"""
from __future__ import annotations

import torch
from torch import Tensor

from megahybrid.kernels.inputs import KernelArgs
from megahybrid.kernels.vocab_parallel import gather_vocab_shards


def reference_logprob_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, args: KernelArgs):
    """hidden [N, D], weight [V_local, D], targets [N] -> (logp, entropy, lse), each [N] in fp32 or wider."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)  # like the fused impls: never below fp32
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    full_weight, own = gather_vocab_shards(weight, args.vocab_start, args.tp_group)
    if args.reduce_hidden_grad or args.tp_group is None:
        logits = hidden @ full_weight.T
    else:  # hidden gradient only through this rank's own shard: the partial gradient
        others = hidden.detach() @ full_weight.T
        mine = hidden @ full_weight[own:own + weight.shape[0]].T
        logits = torch.cat([others[:, :own], mine, others[:, own + weight.shape[0]:]], dim=1)
    logits = logits / args.temperature  # [N, V]
    vocab_size = full_weight.shape[0] if args.vocab_size is None else args.vocab_size
    padding = torch.arange(full_weight.shape[0], device=logits.device) >= vocab_size
    logits = logits.masked_fill(padding, float("-inf"))

    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(1, targets.long()[:, None])[:, 0]
    p = logp_all.exp()
    entropy = -(p * logp_all.masked_fill(padding, 0.0)).sum(-1)  # 0 * -inf would be nan
    lse = torch.logsumexp(logits, dim=-1)
    return logp, entropy, lse
