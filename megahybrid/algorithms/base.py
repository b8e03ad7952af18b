"""The contract between the trainer and a training method (DESIGN.md rule 1).

Flow of one step (the trainer never branches on a method's name, only on these declarations):

    plan = algo.plan(step)                          # rollouts this step? demos? (SASR: SFT vs GRPO step)
    batch = <rollouts (if plan.rollouts) + demos (if plan.demos)>, rewards, old logp/entropy (a no-grad pass if
                                                    # algo.old_logp_before_loss, else the training forward's own)
    keep = algo.keep_sequences(batch)               # dynamic sampling (GRPO filter, SRL std filter)
    algo.observe_groups(step, summaries)            # every rank sees the step's groups (ReLIFT's buffer)
    batch, local_stats = algo.prepare_batch(batch, plan)  # rollout correction + drift stats, then prepare():
                                                    # advantages, gates, weights on this rank's whole groups
    stats = all_reduce(local_stats)                 # over data-parallel ranks (the caller's job): SUM, and MAX
                                                    # for keys starting with `max/`
    for mb in micro-batches of batch:
        loss, metrics = algo.loss(mb, logp, entropy, stats, plan)   # additive share of the global loss
    algo.after_step(plan, grad_norm)                # SASR grad-norm bookkeeping
    for phase in algo.extra_phases(step):           # optional extra optimizer steps on demos (ReLIFT's SFT phase)
        <optimizer steps with algo.extra_loss>; algo.after_extra_phase(phase, metrics)

Global normalisation (rule 2): `loss` returns the micro-batch's *share*: summing the shares of all micro-batches
on all data-parallel ranks gives the loss of SPEC.md. So the caller sums gradients (no averaging over micro-batches
or ranks) and any split of the batch gives the same gradient. Metrics returned by `loss` are additive shares in the
same way; metrics from `metrics_from_stats` are final values.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from megahybrid.config.schema import AlgorithmConfig, RolloutConfig


@dataclass
class Batch:
    """The sequences of one step on this data-parallel rank. A prompt's rollouts and demos are never split across
    ranks (whole groups), so group statistics are local. S sequences, T positions (prompt + response, right-padded).

    Token tensors are aligned with `tokens`: position t holds a quantity of token t given tokens[:t], so
    position 0 is never a response position.
    """

    tokens: Tensor
    """[S, T] long: prompt + response token ids, right-padded."""
    response_mask: Tensor
    """[S, T] bool: response tokens (the only tokens any loss or metric uses)."""
    prompt_index: Tensor
    """[S] long: step-global id of the prompt the sequence answers (its group)."""
    is_demo: Tensor
    """[S] bool: expert demonstration (True) or policy rollout (False)."""
    rewards: Tensor
    """[S] float: reward of the sequence (demos: see the algorithm's demo reward option)."""
    old_logp: Tensor | None = None
    """[S, T] float: log-probs of the policy that produced the rollouts (trainer's no-grad pass)."""
    old_entropy: Tensor | None = None
    """[S, T] float: full-vocabulary entropies from the same pass."""
    ref_logp: Tensor | None = None
    """[S, T] float: log-probs of the frozen reference policy (only when a KL term is on)."""
    engine_logp: Tensor | None = None
    """[S, T] float: log-probs the rollout engine reported (0 for demos)."""
    fields: dict[str, Tensor] = field(default_factory=dict)
    """Per-sequence [S, ...] tensors that `prepare` computes (advantages, gates, weights); sliced with the batch."""

    @property
    def num_sequences(self) -> int:
        return int(self.tokens.shape[0])

    def select(self, index: Tensor | slice) -> "Batch":
        """Sub-batch of sequences (a micro-batch, or the sequences kept by dynamic sampling)."""
        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return Batch(
            tokens=self.tokens[index], response_mask=self.response_mask[index],
            prompt_index=self.prompt_index[index], is_demo=self.is_demo[index], rewards=self.rewards[index],
            old_logp=take(self.old_logp), old_entropy=take(self.old_entropy), ref_logp=take(self.ref_logp),
            engine_logp=take(self.engine_logp), fields={k: v[index] for k, v in self.fields.items()})

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "Batch":
        """Floating tensors to `dtype`/`device` (tests use float64); integer/bool tensors keep their dtype."""
        def conv(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)

        return dataclasses.replace(
            self, **{f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "fields"},
            fields={k: conv(v) for k, v in self.fields.items()})


@dataclass
class StepPlan:
    """What a step does. The trainer reads `rollouts` / `demos` to decide what to generate and load."""

    step: int
    rollouts: bool = True
    """Generate rollouts this step (False for SFT-only steps: no engine time is spent)."""
    demos: bool = False
    """Put the prompts' demonstrations into the batch."""
    old_logp: bool = True
    """The step reads old-policy log-probs / entropies (False: nothing of this step reads them, e.g. SASR's SFT
    steps). They come from a no-grad pass before `prepare` when `Algorithm.old_logp_before_loss`, else from the
    training forward itself (detached)."""
    kind: str = "rl"
    """A short label of the step type for logs (`sft`, `rl`, `hybrid`)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Scheduler metrics of this decision (e.g. sasr/p, sasr/is_sft)."""


@dataclass
class GroupSummary:
    """What every rank knows about one prompt group of the step (the groups are broadcast from rank 0)."""

    example_index: int
    """Index of the example in the training set."""
    rollout_rewards: list[float]
    """Rewards of the group's rollouts."""
    num_demos: int
    """Demonstrations the example has (whether or not this step loaded them)."""


@dataclass
class ExtraPhase:
    """Extra optimizer steps after a step's update (e.g. ReLIFT's SFT phase): train on demonstrations `examples`
    in `mini_batch`-example optimizer steps for `epochs` passes, with an optimizer of its own (`optimizer`: AdamW
    settings; its state is checkpointed by the trainer under `name`), loss `Algorithm.extra_loss`."""

    name: str
    """Label (metric prefix and checkpoint key of the phase's optimizer)."""
    examples: list[tuple[int, int]]
    """(training-set example index, demo index) of each demonstration to train on, in order."""
    mini_batch: int
    """Examples per optimizer step."""
    epochs: int = 1
    """Passes over `examples`."""
    optimizer: dict[str, float] = field(default_factory=dict)
    """`lr`, `weight_decay`, `adam_beta1`, `adam_beta2`, `clip_grad` of the phase's own AdamW."""
    temperature: float = 1.0
    """Temperature of the phase's forward."""


class Algorithm(abc.ABC):
    """Base class of a registered training method. Subclasses set `Config` and the `needs_*` declarations."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig
    needs_demos: ClassVar[bool] = False
    """The method uses expert demonstrations (data must provide them)."""
    needs_rollouts: ClassVar[bool] = True
    """The method uses policy rollouts (a rollout pool is needed)."""
    needs_old_logp: ClassVar[bool] = True
    """The method reads old-policy log-probs / entropies (the default of `StepPlan.old_logp`; a method whose step
    types differ sets it per step in `plan`). Whether they need a pass of their own: `old_logp_before_loss`."""

    @property
    def old_logp_before_loss(self) -> bool:
        """Old-policy log-probs/entropies must exist before the loss: `prepare` (or the rollout correction of
        `prepare_batch`) computes something from them first. Then the trainer runs the separate no-grad pass.
        Otherwise (the default), in a step that makes one optimizer update on its batch, the old policy *is* the
        current one, and the trainer hands `loss` the training forward's own detached log-probs/entropies as
        `old_logp`/`old_entropy`: the same values without a second forward over the batch. A method overrides
        this when its `prepare` reads them (SRFT's batch-scope entropy weights)."""
        return self.correction.mode != "none"  # correction weights come from old - engine log-probs in prepare

    def __init__(self, cfg: AlgorithmConfig, *, seed: int = 0, total_steps: int = 1,
                 rollout: RolloutConfig | None = None):
        from megahybrid.algorithms.correction import Correction

        self.cfg = cfg
        self.seed = seed
        self.total_steps = total_steps
        rollout = rollout if rollout is not None else RolloutConfig()
        self.rollout = rollout
        self.correction = Correction.resolve(rollout, cfg)
        self.max_response_length = rollout.max_new_tokens
        """L_max of `seq_mean_token_sum_norm` (the padded response width of SPEC 10.A)."""

    @classmethod
    def transform_examples(cls, examples: list, cfg: AlgorithmConfig) -> list:
        """Turn dataset records into this method's training instances (default: unchanged). Held-out
        evaluation always uses the original records."""
        return examples

    @property
    def needs_ref(self) -> bool:
        """A frozen reference policy is needed (a KL term is on)."""
        return self.cfg.kl_coef > 0

    def plan(self, step: int) -> StepPlan:
        return StepPlan(step=step, rollouts=self.needs_rollouts, demos=self.needs_demos, old_logp=self.needs_old_logp,
                        kind="sft" if not self.needs_rollouts else ("hybrid" if self.needs_demos else "rl"))

    def keep_sequences(self, batch: Batch) -> Tensor:
        """[S] bool: sequences kept by dynamic sampling (default: all)."""
        return torch.ones(batch.num_sequences, dtype=torch.bool)

    @abc.abstractmethod
    def prepare(self, batch: Batch, plan: StepPlan) -> tuple[Batch, dict[str, Tensor]]:
        """Fill `batch.fields` (advantages, gates, weights) and return local statistics (sums/counts) that the
        caller all-reduces with SUM over data-parallel ranks before calling `loss`."""

    def metrics_from_stats(self, stats: dict[str, Tensor]) -> dict[str, float]:
        """Final (not additive) metrics computed from the all-reduced statistics."""
        return {}

    def prepare_batch(self, batch: Batch, plan: StepPlan) -> tuple[Batch, dict[str, Tensor]]:
        """What the trainer calls: the method-independent part of a step (rollout correction weights and drift
        statistics, SPEC 10.B; L_max for `seq_mean_token_sum_norm`), then the method's own `prepare`."""
        from megahybrid.algorithms.correction import apply_correction
        from megahybrid.algorithms.losses import L_MAX, STAT_DTYPE

        batch, corr_stats = apply_correction(batch, self.correction)
        batch, stats = self.prepare(batch, plan)
        stats.update(corr_stats)
        stats[L_MAX] = torch.tensor(float(self.max_response_length), dtype=STAT_DTYPE, device=batch.tokens.device)
        return batch, stats

    def final_metrics(self, stats: dict[str, Tensor]) -> dict[str, float]:
        """What the trainer logs from the statistics: the method's `metrics_from_stats` plus `mismatch/*` and
        `rollout_corr/*` (SPEC 10.B)."""
        from megahybrid.algorithms.correction import correction_metrics

        return {**self.metrics_from_stats(stats), **correction_metrics(stats, self.correction)}

    @abc.abstractmethod
    def loss(self, mb: Batch, logp: Tensor, entropy: Tensor, stats: dict[str, Tensor],
             plan: StepPlan) -> tuple[Tensor, dict[str, Tensor]]:
        """The micro-batch's additive share of the globally normalised loss, and additive metric shares.

        `logp`, `entropy`: [S_mb, T] current-policy tensors aligned with `mb.tokens` (with grad)."""

    def after_step(self, plan: StepPlan, grad_norm: float) -> dict[str, float]:
        """Bookkeeping after the optimizer step (SASR records SFT grad norms). Returns metrics."""
        return {}

    def observe_groups(self, step: int, groups: list[GroupSummary]) -> dict[str, float]:
        """Sees the step's prompt groups (identical on every rank) before training; returns final metrics. For
        methods whose later steps depend on what happened to which example (ReLIFT's buffer)."""
        return {}

    def extra_phases(self, step: int) -> list[ExtraPhase]:
        """Extra optimizer steps to run after this step's update and `after_step` (default: none)."""
        return []

    def extra_loss(self, phase: ExtraPhase, mb: Batch, logp: Tensor, entropy: Tensor,
                   stats: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss share of an extra phase's micro-batch (demo sequences only; `stats` = all-reduced `base_stats`)."""
        raise NotImplementedError(f"{type(self).__name__} plans extra phases but has no extra_loss")

    def after_extra_phase(self, phase: ExtraPhase, metrics: dict[str, float]) -> dict[str, float]:
        """Bookkeeping after an extra phase ran (`metrics`: its summed loss shares and `grad_norm`); returns final
        metrics."""
        return {}

    def parameters(self) -> list[torch.nn.Parameter]:
        """Learnable parameters of the loss itself (SuperRL log-sigmas); trained by the policy's optimizer."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Everything that affects later steps (checkpointed)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state but got keys {sorted(state)}")
