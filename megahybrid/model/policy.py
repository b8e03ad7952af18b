"""The trained policy (or frozen reference) on one rank: no-grad log-probs/entropies, one optimizer step,
checkpoints and HF export. Every rank of a model-parallel group (TP x PP) must call each method with the same
data (its data-parallel replica's batch): the calls are collective."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from megahybrid.config.schema import ModelConfig, RunConfig
from megahybrid.model.gpt import HeadInfo, PolicyGPTModel, token_logp_entropy
from megahybrid.parallel.init import ParallelState
from megahybrid.training import step as step_lib


class Policy:
    def __init__(self, cfg: RunConfig, ps: ParallelState, model_config: ModelConfig, transformer_config,
                 chunks: list[torch.nn.Module], head: HeadInfo, *, optimizer, scheduler,
                 extra_parameters: list[torch.nn.Parameter]):
        self.cfg = cfg
        self.ps = ps
        self.model_config = model_config
        """The effective ModelConfig (architecture from the HF checkpoint when one was loaded)."""
        self.transformer_config = transformer_config
        self.chunks = chunks
        """Model chunks of this rank (Megatron DDP-wrapped when trainable; one per virtual pipeline stage)."""
        self.head = head
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.extra_parameters = extra_parameters

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def trainable(self) -> bool:
        return self.optimizer is not None

    @property
    def modules(self) -> list[PolicyGPTModel]:
        """The unwrapped GPTModel chunks."""
        return [getattr(c, "module", c) for c in self.chunks]

    def _micro_token_batches(self, tokens: Tensor, micro_batch_size: int,
                             rows: list[list[int]] | None = None, widths: list[int] | None = None) -> list[Tensor]:
        """Token micro-batches: consecutive chunks of `micro_batch_size` rows, or the row sets `rows` trimmed to
        `widths` (a token-budget plan). Equal shapes when pipeline parallel (p2p needs them)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [S, T]; got shape {tuple(tokens.shape)}")
        if tokens.shape[1] < 2:
            raise ValueError(f"tokens need at least 2 positions; got shape {tuple(tokens.shape)}")
        tokens = tokens.to(self.ps.device)
        if rows is None:
            batches = [step_lib.pad_tokens(tokens[i:i + micro_batch_size], micro_batch_size, tokens.shape[1])
                       for i in range(0, tokens.shape[0], micro_batch_size)]
        else:
            index = [torch.tensor(r, dtype=torch.long, device=tokens.device) for r in rows]
            batches = [tokens[i, :max(2, w)] for i, w in zip(index, widths)]
            if self.ps.pp_size > 1:
                batches = self._equal_shapes(batches)
        return batches + self._filler_batches(len(batches), batches[0])

    @staticmethod
    def _equal_shapes(batches: list[Tensor]) -> list[Tensor]:
        num_seq, num_pos = max(b.shape[0] for b in batches), max(b.shape[1] for b in batches)
        return [step_lib.pad_tokens(b, num_seq, num_pos) for b in batches]

    def _filler_batches(self, count: int, like: Tensor | None) -> list[Tensor]:
        """All-padding micro-batches so that every rank runs the schedule (and its gradient all-reduce) at least
        once, and the interleaved (virtual pipeline) schedule gets the PP micro-batches it needs."""
        needed = max(1, self.ps.pp_size if self.ps.vpp_size is not None else 1)
        if count >= needed:
            return []
        like = torch.zeros(1, 2, dtype=torch.long, device=self.ps.device) if like is None else like
        return [torch.zeros_like(like) for _ in range(needed - count)]

    def _broadcast_stacked(self, stacked: Tensor | None, shape: tuple[int, ...]) -> Tensor:
        """A tensor computed on the last pipeline stage -> every stage (known shape)."""
        if self.ps.pp_size == 1:
            return stacked
        if stacked is None:
            stacked = torch.empty(shape, dtype=torch.float32, device=self.ps.device)
        stacked = stacked.contiguous()
        dist.broadcast(stacked, src=self.ps.last_stage_global_rank, group=self.ps.pp_group)
        return stacked

    def _set_mode(self, training: bool) -> None:
        for c in self.chunks:
            c.train(training)

    # ------------------------------------------------------------------------------------------ forward passes
    @torch.no_grad()
    def logp_entropy(self, tokens: Tensor, *, temperature: float = 1.0, micro_batch_size: int,
                     rows: list[list[int]] | None = None, widths: list[int] | None = None,
                     positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """No-grad pass. tokens `[S, T]` -> (logp, entropy) `[S, T]` float32 on CPU, on every rank;
        `logp[s, t] = log p(tokens[s, t] | tokens[s, :t])` at `temperature`, position 0 = 0.

        Micro-batches: `micro_batch_size` consecutive rows, or (token budget) the row sets `rows` each cut to its
        `widths` positions; positions past a row's width come back as 0. `positions` (`[S, T]` bool, e.g. the
        response mask): only those positions go through the head, the others come back as 0."""
        num_seq, num_pos = tokens.shape
        if num_seq == 0:
            return torch.zeros(0, num_pos), torch.zeros(0, num_pos)
        batches = self._micro_token_batches(tokens, micro_batch_size, rows, widths)
        wanted = (None if positions is None else  # cut and padded exactly like the tokens (padding: False)
                  [p.bool() for p in self._micro_token_batches(positions.long(), micro_batch_size, rows, widths)])

        def head(i, model, hidden):
            logp, entropy = token_logp_entropy(model, hidden, batches[i], self.head, temperature=temperature,
                                               positions=None if wanted is None else wanted[i])
            return torch.zeros((), device=hidden.device), {"out": torch.stack([logp, entropy]).float()}

        self._set_mode(False)
        payloads = step_lib.run_pipeline(self.chunks, batches, head, forward_only=True)
        stacked = None
        if payloads and rows is None:
            stacked = torch.cat([p["out"] for p in payloads], dim=1)[:, :num_seq]
        elif payloads:  # scatter each planned micro-batch back to its rows
            stacked = torch.zeros((2, num_seq, num_pos), dtype=torch.float32, device=payloads[0]["out"].device)
            for r, p in zip(rows, payloads):
                out = p["out"][:, :len(r), :num_pos]
                stacked[:, torch.tensor(r, dtype=torch.long, device=out.device), :out.shape[2]] = out
        stacked = self._broadcast_stacked(stacked, (2, num_seq, num_pos))
        stacked = stacked.cpu()
        return stacked[0], stacked[1]

    @torch.no_grad()
    def logits(self, tokens: Tensor) -> Tensor:
        """Full-vocabulary logits `[S, T, V]` (true vocabulary, TP-gathered) on every rank. For tests and
        debugging of small models only: the training path never builds them."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        batches = self._micro_token_batches(tokens, tokens.shape[0])

        def head(i, model, hidden):
            if i > 0:  # fillers of the interleaved schedule
                return torch.zeros((), device=hidden.device), {}
            local = torch.einsum("tsh,vh->stv", hidden, model.head_weight())
            full = gather_from_tensor_model_parallel_region(local, group=self.ps.tp_group)
            return torch.zeros((), device=hidden.device), {"out": full[..., : self.head.vocab_size].float()}

        self._set_mode(False)
        payloads = step_lib.run_pipeline(self.chunks, batches, head, forward_only=True)
        out = payloads[0]["out"] if payloads else None
        return self._broadcast_stacked(out, (*tokens.shape, self.head.vocab_size)).cpu()

    # ------------------------------------------------------------------------------------------------ training
    def train_step(self, micro_batches: Sequence[Any], loss_fn: step_lib.LossFn, *, temperature: float = 1.0
                   ) -> step_lib.StepResult:
        """One optimizer step over `micro_batches` (objects with `.tokens [S, T]`, e.g. algorithms.base.Batch).

        `loss_fn(mb, logp, entropy) -> (loss_share, {metric: share})` runs on the last pipeline stage with
        differentiable `[S, T]` logp/entropy of `mb.tokens`; shares are already globally normalised, and the
        gradient is that of their SUM over micro-batches and data-parallel ranks. loss_fn must not communicate.
        On GPU, micro-batches with a `.to(device=...)` method are moved to the policy's device first.
        A data-parallel rank may pass no micro-batches (it then contributes zero gradient but still takes part
        in the collective reductions); all ranks of one model-parallel group must pass the same ones."""
        if not self.trainable:
            raise RuntimeError("train_step on a frozen policy (built with trainable=False / build_reference)")
        # each micro-batch at its own shape (token-budget micro-batches are trimmed to their longest row);
        # pipeline p2p needs one shape for all (Megatron without variable_seq_lengths)
        batches = [mb.tokens.to(self.ps.device) for mb in micro_batches]
        if self.ps.pp_size > 1 and batches:
            batches = self._equal_shapes(batches)
        batches += self._filler_batches(len(batches), batches[0] if batches else None)

        def head(i, model, hidden):
            if i >= len(micro_batches):  # filler: no loss, but a graph for the schedule's backward
                return hidden.sum() * 0.0, {"loss": torch.zeros(()), "metrics": {}}
            mb = micro_batches[i]
            if self.ps.device.type != "cpu" and hasattr(mb, "to"):
                mb = mb.to(device=self.ps.device)  # e.g. algorithms.base.Batch: masks next to logp
            s, t = mb.tokens.shape
            logp, entropy = token_logp_entropy(model, hidden, batches[i], self.head, temperature=temperature,
                                               positions=self._loss_positions(mb, batches[i]))
            loss, metrics = loss_fn(mb, logp[:s, :t], entropy[:s, :t])
            return loss, {"loss": loss.detach(), "metrics": {k: torch.as_tensor(v).detach()
                                                             for k, v in metrics.items()}}

        self._set_mode(True)
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        payloads = step_lib.run_pipeline(self.chunks, batches, head, forward_only=False)
        updated, grad_norm, lr, num_zeros = step_lib.optimizer_step(self.optimizer, self.scheduler)
        self._sync_extra_parameters()
        loss, metrics = (step_lib.sum_payload_metrics(payloads, self.ps.dp_group)
                         if self.ps.is_last_stage else (0.0, {}))
        loss, metrics = step_lib.broadcast_from_last_stage((loss, metrics), self.ps.pp_group, self.ps.pp_size)
        return step_lib.StepResult(loss=loss, metrics=metrics, grad_norm=grad_norm, lr=lr, num_zeros=num_zeros,
                                   updated=updated)

    @staticmethod
    def _loss_positions(mb: Any, tokens: Tensor) -> Tensor | None:
        """The positions a micro-batch's loss reads (its `response_mask`, the Batch contract), laid out like the
        (possibly padded) `tokens`; None (every position) for micro-batches without one."""
        mask = getattr(mb, "response_mask", None)
        if mask is None:
            return None
        return step_lib.pad_tokens(mask.to(device=tokens.device, dtype=torch.bool), *tokens.shape, pad_id=False)

    def _sync_extra_parameters(self) -> None:
        """Loss scalars are trained on the last stage; other stages receive their new values."""
        if self.ps.pp_size == 1:
            return
        for p in self.extra_parameters:
            dist.broadcast(p.data, src=self.ps.last_stage_global_rank, group=self.ps.pp_group)

    # --------------------------------------------------------------------------------- checkpoints and export
    def sharded_state_dict(self, *, is_loading: bool = False) -> dict[str, Any]:
        """Megatron sharded state dict of model (+ optimizer + scheduler when trainable)."""
        from megahybrid.training.policy_checkpoint import sharded_state_dict

        return sharded_state_dict(self, is_loading=is_loading)

    def save(self, directory: str, extra_state: dict[str, Any] | None = None) -> None:
        """Collective: write a dist_checkpointing checkpoint into `directory` (created if missing)."""
        from megahybrid.training.policy_checkpoint import save_checkpoint

        save_checkpoint(self, directory, extra_state or {})

    def load(self, directory: str) -> dict[str, Any]:
        """Collective: load model (+ optimizer + scheduler) from `directory` (any TP/PP layout); returns the
        `extra_state` given to `save`."""
        from megahybrid.training.policy_checkpoint import load_checkpoint

        return load_checkpoint(self, directory)

    def export_hf(self, out_dir: str, *, tokenizer_dir: str | None = None) -> None:
        """Collective: write the current weights as a Hugging Face folder (safetensors + config (+ tokenizer))."""
        from megahybrid.training.policy_checkpoint import export_hf

        export_hf(self, out_dir, tokenizer_dir=tokenizer_dir)
