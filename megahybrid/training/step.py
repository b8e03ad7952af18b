"""One optimizer step (and the no-grad pass) over micro-batches with Megatron's pipeline schedules.

Normalisation (DESIGN rule 2): the loss function returns each micro-batch's share of the *globally normalised*
loss, so the gradient we want is the gradient of the SUM of shares over micro-batches and data-parallel ranks.
Megatron by default divides by the number of micro-batches and averages over DP; both are switched off:
`TransformerConfig.calculate_per_token_loss=True` makes DDP sum over DP (gradient_scaling_factor 1) and, with
loss functions returning `(loss, num_tokens, payload)`, skips the 1/num_microbatches; our
`finalize_model_grads` wrapper drops the final division by the token count.

Under pipeline parallelism micro-batches are padded to one `[S_max, T_max]` shape (p2p needs fixed shapes): extra
rows are dropped before the loss and extra positions sit after every real token (causal attention: they change
nothing before). Without it each micro-batch runs at its own shape (token-budget micro-batches, trimmed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from megahybrid.parallel.collectives import collective_device

LossFn = Callable[[Any, Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]
"""loss_fn(micro_batch, logp [S, T], entropy [S, T]) -> (loss share, {metric: additive share})."""


@dataclass
class StepResult:
    loss: float
    """Sum of the loss shares over micro-batches and data-parallel ranks (the globally normalised loss)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Metric shares summed over micro-batches and all-reduced (SUM) over data-parallel ranks."""
    grad_norm: float = 0.0
    """Global L2 norm of the gradient before clipping."""
    lr: float = 0.0
    """Learning rate used by this step."""
    num_zeros: int | None = None
    updated: bool = True
    """False when the optimizer skipped the update (fp16 loss scaling found inf/nan gradients)."""


def pad_tokens(tokens: Tensor, num_seq: int, num_pos: int, pad_id: int = 0) -> Tensor:
    """[S, T] -> [num_seq, num_pos], filling new rows/columns with `pad_id`."""
    s, t = tokens.shape
    if (s, t) == (num_seq, num_pos):
        return tokens
    out = torch.full((num_seq, num_pos), pad_id, dtype=tokens.dtype, device=tokens.device)
    out[:s, :t] = tokens
    return out


def finalize_grads_without_token_scaling(model, num_tokens=None, **kwargs):
    """Megatron's finalize_model_grads (DP reduce, tied-embedding and layernorm all-reduces) minus the division
    by the global token count: our losses are normalised by the caller."""
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, None, **kwargs)


def run_pipeline(chunks: list[torch.nn.Module], token_batches: Sequence[Tensor],
                 head: Callable[[int, torch.nn.Module, Tensor], tuple[Tensor, dict[str, Any]]], *,
                 forward_only: bool) -> list[dict[str, Any]]:
    """Run Megatron's forward(-backward) schedule over `[S, T]` token batches (of one shape when pipeline parallel:
    `seq_length`/`micro_batch_size` size the p2p buffers; without pipelining each batch may have its own).

    `head(i, unwrapped_chunk, hidden [T, S, H])` runs on the last stage and returns (loss share, payload);
    returns the payloads in micro-batch order on the last stage ([] elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_attr_wrapped_model

    num_seq, num_pos = token_batches[0].shape

    def loss_func(i: int, model, hidden: Tensor):
        loss, payload = head(i, model, hidden)
        return loss, torch.zeros((), dtype=torch.int), payload

    def forward_step(data_iterator, model):
        i, tokens = next(data_iterator)
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand(tokens.shape[0], -1)
        hidden = model(input_ids=tokens, position_ids=positions, attention_mask=None)
        inner = get_attr_wrapped_model(model, "head_weight", return_model_obj=True)
        return hidden, partial(loss_func, i, inner)

    items = list(enumerate(token_batches))
    iterators = [iter(items) for _ in chunks]
    forward_backward = get_forward_backward_func()
    return forward_backward(
        forward_step_func=forward_step, data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(items), seq_length=num_pos,
        micro_batch_size=num_seq, forward_only=forward_only)


def broadcast_from_last_stage(obj: Any, pp_group, pp_size: int) -> Any:
    """Send a picklable object from the last pipeline stage to every stage of `pp_group`."""
    if pp_size == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=dist.get_global_rank(pp_group, pp_size - 1), group=pp_group)
    return holder[0]


def sum_payload_metrics(payloads: list[dict[str, Any]], dp_group) -> tuple[float, dict[str, float]]:
    """Sum loss and metric shares over micro-batches (last stage) and over data-parallel ranks; metrics whose key
    starts with `max/` take the maximum instead."""
    keys = sorted({k for p in payloads for k in p["metrics"]})
    values = torch.zeros(1 + len(keys), dtype=torch.float64)
    for j, k in enumerate(keys):
        if k.startswith("max/"):
            values[1 + j] = -float("inf")
    for p in payloads:
        values[0] += float(p["loss"])
        for j, k in enumerate(keys):
            if k in p["metrics"]:
                v = float(p["metrics"][k])
                values[1 + j] = max(values[1 + j].item(), v) if k.startswith("max/") else values[1 + j] + v
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        # Every DP rank sees the same keys only if its loss_fn emits the same ones; gather the union first.
        all_keys: list[list[str]] = [[] for _ in range(dist.get_world_size(dp_group))]
        dist.all_gather_object(all_keys, keys, group=dp_group)
        union = sorted(set().union(*map(set, all_keys)))
        if union != keys:
            old = dict(zip(keys, values[1:].tolist()))
            keys, values = union, torch.tensor([values[0].item()] + [old.get(k, 0.0) for k in union],
                                               dtype=torch.float64)
        device = collective_device(dp_group)  # NCCL reduces CUDA tensors only
        is_max = torch.tensor([False] + [k.startswith("max/") for k in keys])
        sums = torch.where(is_max, torch.zeros_like(values), values).to(device)
        dist.all_reduce(sums, group=dp_group)
        if bool(is_max.any()):
            maxima = torch.where(is_max, values, torch.full_like(values, -float("inf"))).to(device)
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=dp_group)
            sums = torch.where(is_max.to(device), maxima, sums)
        values = sums.cpu()
    return float(values[0]), dict(zip(keys, values[1:].tolist()))


def optimizer_step(optimizer, scheduler) -> tuple[bool, float, float, int | None]:
    """Step the Megatron optimizer; returns (updated, pre-clip global grad norm, lr used, num_zeros).

    The optimizer's `clip_grad` is never 0 (an infinite threshold stands for "off", see `optimizer_config`), so
    Megatron always computes the global norm, which SASR needs every step."""
    lr = float(optimizer.param_groups[0]["lr"])
    updated, grad_norm, num_zeros = optimizer.step()
    if updated and scheduler is not None:
        scheduler.step(increment=1)
    return bool(updated), float("nan") if grad_norm is None else float(grad_norm), lr, num_zeros
