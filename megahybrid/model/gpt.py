"""GPTModel that returns hidden states instead of logits, and the log-prob/entropy head on top of it.

The last pipeline stage returns the final-norm hidden states `[T, S, H]`; `token_logp_entropy` feeds them with
this rank's LM-head vocabulary shard to the fused kernel (`megahybrid.kernels`), so `[tokens, vocab]` logits are
never materialised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.gpt import GPTModel
from torch import Tensor

from megahybrid.kernels import token_logprob_entropy


class PolicyGPTModel(GPTModel):
    """Megatron GPTModel whose post-processing stops before the output layer (the head lives in the loss)."""

    def _postprocess(self, hidden_states, *args, **kwargs):
        if self.mtp_process or self.config.mtp_num_layers:
            raise NotImplementedError("multi-token prediction is not used by megahybrid policies")
        return hidden_states

    def head_weight(self) -> Tensor:
        """This rank's LM-head shard `[V_pad / T, H]` (the embedding when tied on a single stage)."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight


@dataclass(frozen=True)
class HeadInfo:
    """What the log-prob head needs to know about the vocabulary layout."""

    vocab_size: int
    """True (unpadded) vocabulary size."""
    padded_vocab_size: int
    tp_rank: int
    tp_size: int
    tp_group: object
    sequence_parallel: bool = False
    impl: str = "chunked"

    @property
    def vocab_start(self) -> int:
        return self.tp_rank * (self.padded_vocab_size // self.tp_size)


def token_logp_entropy(model: PolicyGPTModel, hidden: Tensor, tokens: Tensor, head: HeadInfo, *,
                       temperature: float = 1.0, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """hidden `[T, S, H]` (sequence-sharded under sequence parallelism), tokens `[S, T]` ->
    (logp, entropy) `[S, T]` with `logp[s, t] = log p(tokens[s, t] | tokens[s, :t])` and position 0 set to 0
    (it has no context). Differentiable; identical on every TP rank.

    `positions` (`[S, T]` bool, e.g. a batch's response mask): only these positions go through the head, the
    others come back as 0. The head is a `[tokens, H] x [H, V]` GEMM pair forward and backward, so prompt and
    padding positions that no loss reads are pure waste (a 150-token prompt with a 64-token answer: 70% of the
    head's FLOPs); every TP rank holds the same tokens and mask, so they all pass the same rows."""
    if head.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        # The kernel returns the FULL hidden gradient on every rank, so the backward only splits (no reduce).
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False,
                                                      group=head.tp_group)
    num_seq, num_pos = tokens.shape
    pred = hidden[:-1].transpose(0, 1)  # [S, T-1, H]: position t+1's context
    targets = tokens[:, 1:]
    want = None
    if positions is not None:
        want = positions[:, 1:].to(device=tokens.device, dtype=torch.bool)
        if not bool(want.any()):  # keep one row so the loss still has a graph back to the hidden states
            want = want.clone()
            want[0, 0] = True
        pred, targets = pred[want], targets[want]
    else:
        pred, targets = pred.reshape(num_seq * (num_pos - 1), -1), targets.reshape(-1)
    out = token_logprob_entropy(pred, model.head_weight(), targets, vocab_start=head.vocab_start,
                                vocab_size=head.vocab_size, temperature=temperature,
                                tp_group=head.tp_group if head.tp_size > 1 else None, impl=head.impl)
    if want is None:
        logp, entropy = out.logp.view(num_seq, num_pos - 1), out.entropy.view(num_seq, num_pos - 1)
    else:
        blank = torch.zeros(num_seq, num_pos - 1, dtype=out.logp.dtype, device=out.logp.device)
        logp, entropy = blank.masked_scatter(want, out.logp), blank.masked_scatter(want, out.entropy)
    zeros = torch.zeros(num_seq, 1, dtype=logp.dtype, device=logp.device)
    return torch.cat([zeros, logp], dim=1), torch.cat([zeros, entropy], dim=1)
