"""The training loop. It reads like the algorithm; it never branches on a method's name, only on the
declarations of `Algorithm` (needs_ref, plan.old_logp, plan.rollouts, plan.demos).

Per step:  plan -> prompts -> rollouts + rewards (rank 0, skipped for SFT-only steps) -> demos -> dynamic sampling
-> this rank's whole groups -> old log-probs/entropies (+ reference) -> algorithm.prepare -> all-reduce stats ->
Megatron optimizer step over micro-batches -> algorithm.after_step -> weight sync -> metrics -> eval -> checkpoint.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megahybrid.algorithms.base import Algorithm, Batch, StepPlan
from megahybrid.algorithms.registry import get_algorithm
from megahybrid.config.schema import RunConfig
from megahybrid.parallel.collectives import collective_device
from megahybrid.algorithms.correction import DRIFT_STATS, mismatch_stats
from megahybrid.config.validate import micro_batch_token_budget
from megahybrid.training.batching import (Group, budget_micro_batches, collate, length_multiple, plan_micro_batches,
                                          round_up, sequence_lengths, shard_groups)
from megahybrid.training.sampler import PromptSampler, rng_state, seed_everything, set_rng_state
from megahybrid.training.extra_phase import ExtraPhaseRunner, group_summaries
from megahybrid.training.mismatch import MismatchAlarm
from megahybrid.training.signals import agree
from megahybrid.parallel.nodes import NodeTopology, node_topology
from megahybrid.training.node_generation import log_engine_share

TIMING_PREFIXES = ("time/", "perf/")
"""Metric keys that measure wall time (excluded when comparing runs for exact reproducibility)."""


def check_node_count(cfg: RunConfig, topo: NodeTopology) -> None:
    """Every rank, before any engine starts: the config's node count is the job's (placement depends on it)."""
    if cfg.launch.nodes != topo.num_nodes:
        raise RuntimeError(f"launch.nodes is {cfg.launch.nodes} but the job runs on {topo.num_nodes} node(s) "
                           f"(one launcher per node); set launch.nodes={topo.num_nodes}")


class Trainer:
    def __init__(self, cfg: RunConfig, ps: Any, *, run_dir: Path, tokenizer: Any, train_set: list, eval_set: list):
        from megahybrid.model.provider import build_policy, build_reference
        from megahybrid.training.metrics import MetricsLogger
        from megahybrid.training.run_dir import CheckpointDirs

        self.cfg, self.ps, self.run_dir, self.tokenizer = cfg, ps, run_dir, tokenizer
        self.train_set, self.eval_set = train_set, eval_set
        self.is_rank0 = ps.rank == 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        seed_everything(cfg.train.seed)
        self.algo: Algorithm = get_algorithm(cfg.algorithm.name)(cfg.algorithm, seed=cfg.train.seed,
                                                                 total_steps=cfg.train.steps, rollout=cfg.rollout)
        self.mismatch_alarm = MismatchAlarm(cfg.rollout.max_mismatch_k3, cfg.rollout.mismatch_patience)
        self.extra_phases = ExtraPhaseRunner(self)
        self.policy = build_policy(cfg, ps, extra_parameters=self.algo.parameters())
        self.micro_batch_tokens = micro_batch_token_budget(cfg)
        self.reference = build_reference(cfg, ps) if self.algo.needs_ref else None
        self.sampler = PromptSampler(len(train_set), seed=cfg.train.seed, shuffle=cfg.data.shuffle)
        self.ckpts = CheckpointDirs(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
        self.step = 0
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._resume()
        self.sync_dir = Path(cfg.rollout.sync_dir or run_dir / "weights")
        # the engines start from a folder of the trainer's (initial or resumed) weights, whatever the sync mode
        self.policy.export_hf(str(self.sync_dir), tokenizer_dir=self.tokenizer.name_or_path)
        # True after an update the engines have not received yet. Weights go to the engines only before they next
        # generate (or evaluate, or at the end), so consecutive SFT-only steps (SASR) pay for one sync, not one each.
        # A resumed run re-sends once (its fresh engines already read the folder): the same syncs, and so the same
        # metrics, as the uninterrupted run.
        self.engines_stale = self.step > 0
        self.sync_bytes = 0
        self.topo = node_topology()
        check_node_count(cfg, self.topo)
        self.generator = None  # node leaders: this node's engines and reward workers
        if self.topo.is_leader:
            from megahybrid.training.node_generation import NodeGeneration

            self.generator = NodeGeneration(cfg, tokenizer, str(self.sync_dir), self.topo)
        self.logger = MetricsLogger(run_dir, cfg.logging, total_steps=cfg.train.steps, start_step=self.step,
                                    enabled=self.is_rank0)

    # ------------------------------------------------------------------------------------------- the loop
    def fit(self, preemption: Any = None) -> dict[str, float]:
        """Train until cfg.train.steps (or a pre-emption request). Returns the last evaluation metrics."""
        cfg = self.cfg
        last_eval: dict[str, float] = {}
        if self.step >= cfg.train.steps and self.is_rank0:
            print(f"[megahybrid] resumed at step {self.step}, which is not below train.steps={cfg.train.steps}: "
                  "nothing to train", file=sys.stderr, flush=True)
        if self.step == 0:
            last_eval = self.evaluate(0)
        while self.step < cfg.train.steps:
            metrics = self.train_one_step()
            self.step += 1
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 or self.step == cfg.train.steps:
                last_eval = self.evaluate(self.step)
                metrics.update(last_eval)
            self.logger.log(self.step, metrics)
            stop = preemption is not None and agree(preemption.requested)
            if stop or self.step == cfg.train.steps or (cfg.train.save_every and self.step % cfg.train.save_every == 0):
                self.save()
            if stop:
                break
        # the run's final weights as a folder (the next curriculum stage starts there); broadcast mode writes it
        # directly: sending them to engines that are about to close would be wasted
        if self.cfg.rollout.weight_sync == "broadcast":
            self.policy.export_hf(str(self.sync_dir), tokenizer_dir=self.tokenizer.name_or_path)
        else:
            self.sync_engines()
        if self.generator is not None:
            log_engine_share(self.generator)
        return last_eval

    def train_one_step(self) -> dict[str, float]:
        t_step = time.perf_counter()
        plan = self.algo.plan(self.step)
        self.sync_bytes = 0
        sync_s = self.sync_engines() if plan.rollouts else 0.0
        groups, metrics = self._collect_groups(plan)
        metrics.update(self.algo.observe_groups(self.step, group_summaries(groups, self.train_set)))
        metrics["time/sync_s"] = sync_s
        if self.is_rank0:
            metrics["sync/bytes"] = float(self.sync_bytes)
        if not groups:
            # dynamic sampling kept no group within train.max_sample_rounds: no update this step (an optimizer
            # step on zero gradients would still move Adam's weights)
            metrics.update(plan.metrics)
            metrics.update({"batch/skipped": 1.0, "time/step_s": time.perf_counter() - t_step})
            return metrics
        mine, offset = shard_groups(groups, self.ps.dp_rank, self.ps.dp_size)
        batch = collate(mine, prompt_offset=offset, pad_id=self.pad_id, length_multiple=self._length_multiple())
        # one optimizer update per batch: unless the method computes something from the old policy before its
        # loss, the old policy is the current one and the training forward supplies the old values itself
        old_from_forward = (plan.old_logp and not self.algo.old_logp_before_loss
                            and self.cfg.train.old_logp_pass == "auto")
        metrics["batch/old_logp_pass"] = float(plan.old_logp and not old_from_forward)
        t0 = time.perf_counter()
        self._fill_old_logp(batch, plan, separate_pass=not old_from_forward)
        metrics["time/old_logp_s"] = time.perf_counter() - t0
        batch, local_stats = self.algo.prepare_batch(batch, plan)
        stats = self._reduce_stats(local_stats)
        mbs = self._micro_batches(batch)
        t0 = time.perf_counter()
        result = self.policy.train_step(mbs, self._loss_fn(stats, plan, old_from_forward),
                                        temperature=self.cfg.rollout.temperature)
        metrics["time/train_s"] = time.perf_counter() - t0
        if old_from_forward:  # the drift statistics came out of the loss: they belong with the others
            stats = {**stats, **{k: torch.tensor(result.metrics.pop(k), dtype=torch.float64)
                                 for k in DRIFT_STATS if k in result.metrics}}
        metrics.update({k: float(v) for k, v in result.metrics.items()})
        metrics["actor/grad_norm"] = float(result.grad_norm)
        metrics["optim/lr"] = float(result.lr)
        metrics["optim/skipped"] = 0.0 if result.updated else 1.0  # fp16 loss scaling found inf/nan gradients
        self.engines_stale = self.engines_stale or result.updated
        metrics.update(self.algo.final_metrics(stats))
        metrics.update(self.mismatch_alarm.check(self.step, metrics))
        metrics.update(plan.metrics)
        if plan.kind in ("sft", "rl"):  # hybrid methods log their own routing fraction
            metrics["train/sft_frac"] = 1.0 if plan.kind == "sft" else 0.0
        metrics.update(self.algo.after_step(plan, float(result.grad_norm)))
        for phase in self.algo.extra_phases(self.step):  # e.g. ReLIFT's SFT phase, on its own optimizer
            metrics.update(self.extra_phases.run(phase))
        metrics.update(self._batch_metrics(groups))
        metrics["time/step_s"] = time.perf_counter() - t_step
        num_tokens = self._all_reduce_sum({"n": batch.response_mask.sum().double()})["n"]
        metrics["perf/tokens_per_s"] = float(num_tokens) / max(metrics["time/train_s"], 1e-9)
        return metrics

    # ------------------------------------------------------------------------------------------- step pieces
    def _collect_groups(self, plan: StepPlan) -> tuple[list[Group], dict[str, float]]:
        """Rank 0 samples prompts, generates and scores (resampling for dynamic filters); all ranks get the groups.
        The sampler advances identically on every rank (its position travels with the groups)."""
        payload = None
        if self.is_rank0:
            payload = self._generate_groups(plan)
            self.generator.finish()
        elif self.generator is not None:
            self.generator.serve()  # this node's share of every sampling round
        payload = self._broadcast(payload)
        groups, metrics, position = payload
        self.sampler.position = position
        return groups, metrics

    def _generate_groups(self, plan: StepPlan) -> tuple[list[Group], dict[str, float], int]:
        from megahybrid.training.generation import filter_groups, light_batch

        want = self.cfg.train.prompts_per_step
        kept: list[Group] = []
        metrics: dict[str, float] = {"time/rollout_s": 0.0}
        rounds = 0
        num_generated = 0
        while len(kept) < want and rounds <= self.cfg.train.max_sample_rounds:
            need = want - len(kept)
            picks = self.sampler.take(need)
            seed = (self.cfg.train.seed * 1_000_003 + self.step) * 101 + rounds
            groups, m = self.generator.make_groups([(i, self.train_set[i]) for i in picks], plan, seed=seed)
            metrics["time/rollout_s"] += m["time/rollout_s"]
            num_generated += len(groups)
            kept += filter_groups(groups, self.algo.keep_sequences(light_batch(groups)))
            rounds += 1
        kept = kept[:want]
        # whole groups per data-parallel rank, the same number on each (fewer than one per rank: nothing to train)
        usable = len(kept) - len(kept) % self.ps.dp_size
        metrics["batch/sample_rounds"] = float(rounds)
        metrics["batch/prompts_generated"] = float(num_generated)
        metrics["batch/prompts_kept"] = float(usable)
        metrics["reward/timeouts"] = float(self.generator.num_reward_timeouts)
        # cumulative engine restarts and timeouts, every step: an engine that died shows here
        metrics.update(self.generator.metrics())
        return kept[:usable], metrics, self.sampler.position

    def _fill_old_logp(self, batch: Batch, plan: StepPlan, *, separate_pass: bool = True) -> None:
        """No-grad passes: the old policy's log-probs/entropies (when the step reads them and they cannot come from
        the training forward) and the reference's (KL)."""
        if not (plan.old_logp and separate_pass) and self.reference is None:
            return
        temp = self.cfg.rollout.temperature
        lengths = sequence_lengths(batch)
        rows = self._micro_batch_plan(batch, uniform=self.ps.pp_size > 1, lengths=lengths)
        widths = [round_up(max([lengths[i] for i in r], default=1), self._length_multiple()) for r in rows]
        kw = dict(temperature=temp, micro_batch_size=self.cfg.train.micro_batch_size, rows=rows, widths=widths,
                  positions=batch.response_mask)  # the head runs only where a loss or metric reads a value
        if plan.old_logp and separate_pass:
            batch.old_logp, batch.old_entropy = self.policy.logp_entropy(batch.tokens, **kw)
        if self.reference is not None:
            batch.ref_logp, _ = self.reference.logp_entropy(batch.tokens, **kw)

    def _loss_fn(self, stats: dict[str, torch.Tensor], plan: StepPlan, old_from_forward: bool):
        """The method's loss; with `old_from_forward`, the micro-batch's old log-probs/entropies are the forward's
        own detached values, and the drift statistics (engine vs trainer, SPEC 10.B) come out as metric shares."""
        def loss(mb: Batch, logp: torch.Tensor, ent: torch.Tensor):
            if not old_from_forward:
                return self.algo.loss(mb, logp, ent, stats, plan)
            mb = dataclasses.replace(mb, old_logp=logp.detach(), old_entropy=ent.detach())
            value, shares = self.algo.loss(mb, logp, ent, stats, plan)
            if mb.engine_logp is not None:
                rollout = mb.response_mask & ~mb.is_demo[:, None]
                shares = {**shares, **mismatch_stats(mb.old_logp, mb.engine_logp, rollout)}
            return value, shares
        return loss

    def _reduce_stats(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """All-reduce the algorithm's statistics: SUM, except keys starting with `max/` (maxima, e.g. the largest
        engine/trainer log-prob gap), which take the MAX over data-parallel ranks."""
        maxima = {k: v for k, v in stats.items() if k.startswith("max/")}
        out = self._all_reduce_sum({k: v for k, v in stats.items() if k not in maxima})
        if maxima and self.ps.dp_size > 1:  # a few scalars: gather them as objects (any backend, any device)
            gathered: list[dict[str, float]] = [{} for _ in range(self.ps.dp_size)]
            dist.all_gather_object(gathered, {k: float(v) for k, v in maxima.items()}, group=self.ps.dp_group)
            maxima = {k: torch.tensor(max(g[k] for g in gathered), dtype=v.dtype, device=v.device)
                      for k, v in maxima.items()}
        return {**out, **maxima}

    def _length_multiple(self) -> int:
        """From the effective TransformerConfig: sequence parallel is on for GPUs only (model/spec.py)."""
        tc = self.policy.transformer_config
        return length_multiple(tensor_model_parallel_size=tc.tensor_model_parallel_size,
                               sequence_parallel=bool(tc.sequence_parallel), fp8=bool(getattr(tc, "fp8", None)))

    def _micro_batch_plan(self, batch: Batch, *, uniform: bool, lengths: list[int] | None = None
                          ) -> list[list[int]]:
        """Rows of each micro-batch: by length, within `train.max_tokens_per_micro_batch` tokens and
        `train.micro_batch_size` rows (batching.plan_micro_batches)."""
        lengths = sequence_lengths(batch) if lengths is None else lengths
        return plan_micro_batches(lengths, max_rows=self.cfg.train.micro_batch_size,
                                  max_tokens=self.micro_batch_tokens, multiple=self._length_multiple(),
                                  uniform=uniform)

    def _micro_batches(self, batch: Batch) -> list[Batch]:
        """Token-budget micro-batches, each trimmed to its longest row (one shape when pipeline parallel); every
        data-parallel rank runs the same number (max over ranks, the short ranks add empty ones)."""
        plan = self._micro_batch_plan(batch, uniform=self.ps.pp_size > 1)
        count = torch.tensor([max(1, len(plan))], dtype=torch.long)
        if self.ps.dp_size > 1:
            count = count.to(collective_device(self.ps.dp_group))  # NCCL reduces CUDA tensors only
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.ps.dp_group)
        return budget_micro_batches(batch, plan, int(count.item()), self.pad_id, multiple=self._length_multiple())

    def _batch_metrics(self, groups: list[Group]) -> dict[str, float]:
        rollouts = [s for g in groups for s in g.sequences if not s.is_demo]
        out: dict[str, float] = {"batch/prompts": float(len(groups)), "batch/rollouts": float(len(rollouts))}
        if rollouts:
            out["reward/mean"] = sum(s.reward for s in rollouts) / len(rollouts)
            out["reward/accuracy"] = sum(s.reward > 0 for s in rollouts) / len(rollouts)
            out["response_length/mean"] = sum(len(s.response_ids) for s in rollouts) / len(rollouts)
            out["response_length/clip_frac"] = sum(s.finish_reason == "length" for s in rollouts) / len(rollouts)
        return out

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, step: int) -> dict[str, float]:
        self.sync_engines()
        metrics = None
        if self.is_rank0 and self.eval_set:
            tr = self.cfg.train
            metrics = self.generator.evaluate(
                self.eval_set, n=tr.eval_n, temperature=tr.eval_temperature,
                max_new_tokens=tr.eval_max_new_tokens or self.cfg.rollout.max_new_tokens,
                seed=tr.seed * 7919 + step)
            self.generator.finish()
            self.logger.log_eval(step, metrics)
        elif self.generator is not None and self.eval_set:
            self.generator.serve()
        metrics = self._broadcast(metrics) or {}
        if metrics:  # on every rank: the history is part of the (rank-identical) checkpoint state
            self.history.setdefault("eval/accuracy", []).append((step, metrics.get("eval/accuracy", float("nan"))))
        return metrics

    # ------------------------------------------------------------------------------------------- weights / state
    def sync_engines(self) -> float:
        """Send the weights to the engines if an update happened since the last sync; returns the seconds."""
        if not self.engines_stale:
            return 0.0
        self.engines_stale = False
        return self._export_weights()

    def _export_weights(self) -> float:
        """Collective: the current weights to every node's engines (`rollout.weight_sync`); returns seconds.

        broadcast: gathered onto rank 0, bucketed to the node leaders, broadcast to their engines; nothing touches
        the disk. dir: rank 0 writes a HF folder that every node's engines re-read (the fallback)."""
        t0 = time.perf_counter()
        if self.cfg.rollout.weight_sync == "broadcast":
            from megahybrid.training.weight_sync import gather_hf_tensors, num_bytes, to_leaders

            tensors = to_leaders(gather_hf_tensors(self.policy), self.topo, self.cfg.rollout.sync_bucket_mb)
            if self.generator is not None:
                self.generator.update_weights(tensors)
                self.sync_bytes = num_bytes(tensors)
        else:
            self.policy.export_hf(str(self.sync_dir), tokenizer_dir=self.tokenizer.name_or_path)
            self._barrier()
            if self.generator is not None:
                self.generator.update_weights(str(self.sync_dir))
                self.sync_bytes = sum(p.stat().st_size for p in self.sync_dir.glob("*.safetensors"))
        return time.perf_counter() - t0

    def extra_state(self) -> dict[str, Any]:
        return {"step": self.step, "sampler": self.sampler.state_dict(), "algorithm": self.algo.state_dict(),
                "rng": rng_state(), "history": self.history, "mismatch_alarm": self.mismatch_alarm.state_dict()}

    def save(self) -> Path | None:
        staging = self.ckpts.staging(self.step) if self.is_rank0 else None
        staging = self._broadcast(str(staging) if staging else None)
        self.policy.save(staging, self.extra_state())
        self.extra_phases.save(Path(staging))  # per-rank optimizer states of extra phases (ReLIFT's SFT)
        self._barrier()
        final = self.ckpts.commit(Path(staging), self.step) if self.is_rank0 else None
        self._barrier()
        return final

    def _resume(self) -> None:
        if self.cfg.train.resume != "auto":
            return
        latest = None
        if self.is_rank0:
            latest = self.ckpts.latest_complete()
            for path, reason in self.ckpts.skipped().items():
                print(f"[megahybrid] ignoring incomplete checkpoint {path}: {reason}", file=sys.stderr, flush=True)
            if latest is not None:
                print(f"[megahybrid] resuming from {latest}", file=sys.stderr, flush=True)
        latest = self._broadcast(str(latest) if latest else None)
        if latest is None:
            return
        state = self.policy.load(latest)
        self.extra_phases.load(Path(latest))
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.algo.load_state_dict(state["algorithm"])
        set_rng_state(state["rng"])
        self.history = state.get("history", {})
        self.mismatch_alarm.load_state_dict(state.get("mismatch_alarm", {}))

    # ------------------------------------------------------------------------------------------- collectives
    def _broadcast(self, obj: Any) -> Any:
        if self.ps.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _barrier(self) -> None:
        if self.ps.world_size > 1:
            dist.barrier()

    def _all_reduce_sum(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.ps.dp_size == 1 or not stats:
            return stats
        keys = sorted(stats)
        # NCCL reduces CUDA tensors only: reduce on the group's device, hand back on each stat's own device
        flat = torch.cat([stats[k].double().reshape(-1) for k in keys]).to(collective_device(self.ps.dp_group))
        dist.all_reduce(flat, group=self.ps.dp_group)
        out, i = {}, 0
        for k in keys:
            n = stats[k].numel()
            out[k] = flat[i:i + n].reshape(stats[k].shape).to(device=stats[k].device, dtype=stats[k].dtype)
            i += n
        return out

    def close(self) -> None:
        self.logger.close()
        if self.generator is not None:
            self.generator.close()
