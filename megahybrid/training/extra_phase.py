"""Extra optimizer steps that a method asks for after a step's update (`Algorithm.extra_phases`; ReLIFT's SFT phase).

A phase trains on demonstrations named by (example index, demo index), in mini-batches of examples, with an AdamW of
its own: its moments must not mix with the RL optimizer's (ReLIFT builds a separate optimizer for the SFT phase).
Both optimizers update the same parameters: a mixed-precision Megatron optimizer keeps fp32 master copies, so each
one reloads the master copies from the model before it steps (`reload_model_params`), or the other's updates would
be overwritten.

Checkpointing: every rank writes its own phase-optimizer states (`megahybrid_extra_optimizers_rank<r>.pt` in the
checkpoint directory; each rank's shard under TP/PP or the distributed optimizer), so a resume needs the same parallel
layout (checked on load). Megatron's dist_checkpointing (any-layout resharding) is used for the main optimizer only.
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from megahybrid.algorithms.base import ExtraPhase, GroupSummary
from megahybrid.algorithms.common import base_stats
from megahybrid.data.tokenize import prompt_token_ids
from megahybrid.training.batching import Group, Sequence, collate, shard_groups

STATE_FILE_PREFIX = "megahybrid_extra_optimizers_rank"
"""Per-rank file of the phase optimizers' states inside a checkpoint directory."""


def group_summaries(groups: list[Group], train_set: list) -> list[GroupSummary]:
    return [GroupSummary(example_index=g.example_index, rollout_rewards=[s.reward for s in g.rollouts],
                         num_demos=len(train_set[g.example_index].demos)) for g in groups]


def demo_groups(trainer, examples: list[tuple[int, int]]) -> list[Group]:
    """One group per (example, demo): the prompt and that demo + EOS (encoded as the generator encodes demos)."""
    tok, out = trainer.tokenizer, []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for idx, d in examples:
        ex = trainer.train_set[idx]
        text, ids = prompt_token_ids(tok, ex.prompt, trainer.cfg.data.template)
        demo = tok.encode(ex.demos[d], add_special_tokens=False) + eos
        out.append(Group(example_index=idx, prompt_text=text, prompt_ids=ids, answer=ex.answer,
                         sequences=[Sequence(prompt_ids=ids, response_ids=demo, is_demo=True, reward=0.0)]))
    return out


@contextmanager
def using_optimizer(policy, optimizer):
    """Let `policy.train_step` step `optimizer` (no lr schedule) instead of the policy's own, then switch back."""
    saved = policy.optimizer, policy.scheduler
    _reload(optimizer)
    policy.optimizer, policy.scheduler = optimizer, None
    try:
        yield
    finally:
        policy.optimizer, policy.scheduler = saved
        _reload(saved[0])


def _reload(optimizer) -> None:
    reload = getattr(optimizer, "reload_model_params", None)
    if callable(reload):
        reload()


class ExtraPhaseRunner:
    def __init__(self, trainer):
        self.trainer = trainer
        self.optimizers: dict[str, Any] = {}
        self.pending: dict[str, Any] = {}
        """Optimizer states from a checkpoint, loaded when the phase's optimizer is first built."""

    def optimizer(self, phase: ExtraPhase):
        if phase.name not in self.optimizers:
            from megatron.core.optimizer import get_megatron_optimizer

            from megahybrid.model.provider import optimizer_config

            t = self.trainer
            o = phase.optimizer
            config = dataclasses.replace(
                optimizer_config(t.cfg, t.policy.model_config), lr=o["lr"], min_lr=o["lr"],
                weight_decay=o.get("weight_decay", 0.0), adam_beta1=o.get("adam_beta1", 0.9),
                adam_beta2=o.get("adam_beta2", 0.999),
                clip_grad=o["clip_grad"] if o.get("clip_grad", 0) > 0 else math.inf)
            opt = get_megatron_optimizer(config, t.policy.chunks)
            if phase.name in self.pending:
                opt.optimizer.load_state_dict(self.pending.pop(phase.name))
            self.optimizers[phase.name] = opt
        return self.optimizers[phase.name]

    def run(self, phase: ExtraPhase) -> dict[str, float]:
        """All optimizer steps of `phase`; returns the algorithm's metrics of it (last step's loss shares)."""
        t = self.trainer
        opt = self.optimizer(phase)
        metrics: dict[str, float] = {}
        for _ in range(phase.epochs):
            for start in range(0, len(phase.examples), phase.mini_batch):
                groups = demo_groups(t, phase.examples[start:start + phase.mini_batch])
                mine, offset = shard_groups(groups, t.ps.dp_rank, t.ps.dp_size)
                batch = collate(mine, prompt_offset=offset, pad_id=t.pad_id)
                stats = t._reduce_stats(base_stats(batch))
                mbs = t._micro_batches(batch)  # collective: every rank takes part
                with using_optimizer(t.policy, opt):
                    result = t.policy.train_step(
                        mbs if mine else [],  # a mini-batch smaller than DP leaves some ranks without examples
                        lambda mb, logp, ent: t.algo.extra_loss(phase, mb, logp, ent, stats),
                        temperature=phase.temperature)
                metrics = {k: float(v) for k, v in result.metrics.items()}
                metrics["grad_norm"] = float(result.grad_norm)
        return t.algo.after_extra_phase(phase, metrics)

    def save(self, directory: Path) -> None:
        """Every rank writes its own phase-optimizer states (each holds its own shard under TP/PP or the
        distributed optimizer) with the layout they belong to. Collective-free: the caller's barrier follows."""
        states = {**self.pending, **{k: o.optimizer.state_dict() for k, o in self.optimizers.items()}}
        if states:
            torch.save({"layout": self._layout(), "optimizers": states}, directory / self._file())

    def load(self, directory: Path) -> None:
        """This rank's saved states (none saved: nothing to load); they are loaded when a phase builds its
        optimizer. A checkpoint from another layout cannot be resumed by this rank."""
        path = directory / self._file()
        if not path.exists():
            return
        saved = torch.load(path, weights_only=False)
        if saved["layout"] != self._layout():
            raise RuntimeError(f"{path}: extra-phase optimizer state was saved with layout {saved['layout']}, "
                               f"this run has {self._layout()}; resume with the same parallel layout")
        self.pending = dict(saved["optimizers"])

    def _file(self) -> str:
        return f"{STATE_FILE_PREFIX}{self.trainer.ps.rank:05d}.pt"

    def _layout(self) -> dict[str, int]:
        ps, par = self.trainer.ps, self.trainer.cfg.parallel
        return {"world_size": ps.world_size, "tensor": par.tensor_model_parallel_size,
                "pipeline": par.pipeline_model_parallel_size,
                "distributed_optimizer": int(par.use_distributed_optimizer)}
