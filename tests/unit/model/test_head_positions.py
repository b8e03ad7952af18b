"""The log-prob head runs only on the positions a loss reads (issue 14): `token_logp_entropy(positions=mask)` gives
the full computation's values there and 0 elsewhere, the same gradients for any loss over those positions, and
sends only those rows through the kernel."""
import pytest
import torch
import torch.nn.functional as F

import megahybrid.model.gpt as gpt
from megahybrid.model.gpt import HeadInfo, token_logp_entropy


class _Head:
    def __init__(self, weight):
        self.weight = weight

    def head_weight(self):
        return self.weight


def _case(seed, S=3, T=9, H=8, V=13):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, S, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (S, T), generator=g)
    mask = torch.zeros(S, T, dtype=torch.bool)
    for s in range(S):  # a prompt of 2-4 tokens, then a response of random length, then padding
        start = 2 + s
        mask[s, start:start + int(torch.randint(1, T - start + 1, (1,), generator=g))] = True
    return hidden, weight, tokens, mask, HeadInfo(vocab_size=V, padded_vocab_size=V, tp_rank=0, tp_size=1,
                                                  tp_group=None)


def _reference(hidden, weight, tokens, temperature):
    """float64 log-softmax over the materialised logits at every position (position 0: 0)."""
    logits = torch.einsum("tsh,vh->stv", hidden, weight) / temperature
    logq = F.log_softmax(logits[:, :-1], dim=-1)
    logp = logq.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    entropy = -(logq.exp() * logq).sum(-1)
    zeros = torch.zeros(tokens.shape[0], 1, dtype=logp.dtype)
    return torch.cat([zeros, logp], 1), torch.cat([zeros, entropy], 1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_masked_head_values_and_gradients_equal_the_full_head(seed, temperature):
    hidden, weight, tokens, mask, info = _case(seed)
    ref_logp, ref_ent = _reference(hidden, weight, tokens, temperature)
    coef = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    ((ref_logp * coef + 0.3 * ref_ent) * mask).sum().backward()
    ref_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    logp, ent = token_logp_entropy(_Head(weight), hidden, tokens, info, temperature=temperature, positions=mask)
    torch.testing.assert_close(logp, torch.where(mask, ref_logp, 0.0).detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ent, torch.where(mask, ref_ent, 0.0).detach(), rtol=1e-6, atol=1e-8)
    ((logp * coef + 0.3 * ent) * mask).sum().backward()
    torch.testing.assert_close(hidden.grad, ref_grads[0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(weight.grad, ref_grads[1], rtol=1e-6, atol=1e-8)


def test_only_the_wanted_rows_reach_the_kernel(monkeypatch):
    hidden, weight, tokens, mask, info = _case(7)
    seen = []
    kernel = gpt.token_logprob_entropy

    def spy(pred, *args, **kwargs):
        seen.append(pred.shape[0])
        return kernel(pred, *args, **kwargs)

    monkeypatch.setattr(gpt, "token_logprob_entropy", spy)
    token_logp_entropy(_Head(weight), hidden, tokens, info, positions=mask)
    token_logp_entropy(_Head(weight), hidden, tokens, info)
    assert seen == [int(mask[:, 1:].sum()), tokens.shape[0] * (tokens.shape[1] - 1)]


def test_a_micro_batch_with_no_wanted_position_still_has_a_graph():
    hidden, weight, tokens, _, info = _case(3)
    logp, ent = token_logp_entropy(_Head(weight), hidden, tokens, info,
                                   positions=torch.zeros(tokens.shape, dtype=torch.bool))
    (logp.sum() * 0.0 + ent.sum() * 0.0).backward()  # Megatron's schedule backpropagates every loss
    assert hidden.grad is not None and torch.count_nonzero(hidden.grad) == 0
