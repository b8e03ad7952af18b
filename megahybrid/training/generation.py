"""One node's side of a step: prompts -> its rollout pool -> its rewards -> groups (and held-out evaluation).

The rollout engines live in their own worker processes (vLLM in-process mode patches torch threading and seeds
the global RNG, so it must never share the trainer's interpreter). Each node leader owns one Generator for the
engines of its node (training/node_generation.py spreads a step's prompts over them); the finished groups are
broadcast to every rank as Python objects (they are small: token ids and floats).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from megahybrid.algorithms.base import Batch, StepPlan
from megahybrid.config.schema import RunConfig
from megahybrid.data.records import Example
from megahybrid.data.tokenize import prompt_token_ids
from megahybrid.training.batching import Group, Sequence


class Generator:
    """Owns one node's rollout pool and reward pool (its node leader only).

    `gpu_ids`: the node-local GPUs of its engines (`Layout.node_engines`, flattened); `log_dir`: the engines' logs
    (default `<run_dir>/logs`)."""

    def __init__(self, cfg: RunConfig, tokenizer: Any, model_dir: str, *, gpu_ids: list[int] | None = None,
                 log_dir: str | None = None):
        from megahybrid.rewards import RewardPool
        from megahybrid.rollout import RolloutPool

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.pool = RolloutPool(cfg.rollout, model_dir, seed=cfg.train.seed,
                                max_model_len=cfg.model.max_position_embeddings,
                                log_dir=log_dir or str(Path(cfg.train.run_dir) / "logs"), gpu_ids=gpu_ids)
        think = {"srl_require_think": getattr(cfg.algorithm, "require_think", True)}
        self.rewards = RewardPool(cfg.reward, **think)
        eval_name = cfg.reward.eval_name or cfg.reward.name
        self.eval_rewards = self.rewards if eval_name == cfg.reward.name else \
            RewardPool(dataclasses.replace(cfg.reward, name=eval_name), **think)
        self.num_reward_timeouts = 0

    def close(self) -> None:
        self.pool.close()
        self.rewards.close()
        if self.eval_rewards is not self.rewards:
            self.eval_rewards.close()

    # ------------------------------------------------------------------------------------------- prompts
    def prompt_ids(self, ex: Example) -> tuple[str, list[int]]:
        return prompt_token_ids(self.tokenizer, ex.prompt, self.cfg.data.template)

    def _sampling(self, *, temperature: float, max_new_tokens: int, seed: int):
        from megahybrid.rollout import SamplingOptions

        ro = self.cfg.rollout
        return SamplingOptions(temperature=temperature, top_p=ro.top_p, top_k=ro.top_k,
                               max_new_tokens=max_new_tokens, stop=list(ro.stop), seed=seed, logprobs=True)

    def _score(self, texts: list[str], references: list[str], pool: Any = None) -> list[float]:
        if not texts:
            return []
        result = (pool or self.rewards).score(texts, references)
        self.num_reward_timeouts += result.num_timeouts
        return [float(s) for s in result.scores]

    # ------------------------------------------------------------------------------------------- training groups
    def make_groups(self, examples: list[tuple[int, Example]], plan: StepPlan, *, seed: int,
                    seed_offset: int = 0) -> tuple[list[Group], dict]:
        """Groups for `examples` ((dataset index, example) pairs): rollouts if the plan wants them, demos if it
        wants them, every sequence scored. `seed_offset`: position of the first example in the whole request
        (its per-prompt sampling seed), when this node serves a share of it."""
        groups = []
        for idx, ex in examples:
            text, ids = self.prompt_ids(ex)
            groups.append(Group(example_index=idx, prompt_text=text, prompt_ids=ids, answer=ex.answer))
        metrics: dict[str, float] = {}
        t0 = time.perf_counter()
        if plan.rollouts and groups:
            ro = self.cfg.rollout
            samples = self.pool.generate([g.prompt_ids for g in groups], ro.n,
                                         self._sampling(temperature=ro.temperature,
                                                        max_new_tokens=ro.max_new_tokens, seed=seed),
                                         seed_offset=seed_offset)
            for group, outs in zip(groups, samples):
                group.sequences.extend(
                    Sequence(prompt_ids=group.prompt_ids, response_ids=list(o.token_ids), is_demo=False, reward=0.0,
                             engine_logp=list(o.logprobs), finish_reason=o.finish_reason) for o in outs)
            texts = [o.text for outs in samples for o in outs]
            refs = [g.answer for g, outs in zip(groups, samples) for _ in outs]
            scores = iter(self._score(texts, refs))
            for group in groups:
                for s in group.sequences:
                    s.reward = next(scores)
        metrics["time/rollout_s"] = time.perf_counter() - t0
        if plan.demos:
            self._add_demos(groups, [ex for _, ex in examples])
        return groups, metrics

    def _add_demos(self, groups: list[Group], examples: list[Example]) -> None:
        eos = self.tokenizer.eos_token_id
        demo_texts, refs, seqs = [], [], []
        for group, ex in zip(groups, examples):
            for demo in ex.demos:
                ids = self.tokenizer.encode(demo, add_special_tokens=False) + ([eos] if eos is not None else [])
                seq = Sequence(prompt_ids=group.prompt_ids, response_ids=ids, is_demo=True, reward=0.0)
                group.sequences.append(seq)
                seqs.append(seq)
                demo_texts.append(demo)
                refs.append(ex.answer)
        for seq, score in zip(seqs, self._score(demo_texts, refs)):
            seq.reward = score

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, examples: list[Example], *, n: int, temperature: float, max_new_tokens: int,
                 seed: int) -> dict[str, float]:
        """avg@n / pass@1 / pass@n on held-out problems (SPEC 7); correct = reward > 0."""
        if not examples:
            return {}
        return eval_metrics(*self.eval_samples(examples, n=n, temperature=temperature,
                                               max_new_tokens=max_new_tokens, seed=seed), n)

    def eval_samples(self, examples: list[Example], *, n: int, temperature: float, max_new_tokens: int, seed: int,
                     seed_offset: int = 0) -> tuple[list[list[float]], list[int]]:
        """Per problem its n correctness values (reward > 0), and every sample's length."""
        if not examples:
            return [], []
        prompts = [self.prompt_ids(ex)[1] for ex in examples]
        samples = self.pool.generate(prompts, n, self._sampling(temperature=temperature,
                                                                max_new_tokens=max_new_tokens, seed=seed),
                                     seed_offset=seed_offset)
        texts = [o.text for outs in samples for o in outs]
        refs = [ex.answer for ex, outs in zip(examples, samples) for _ in outs]
        scores = self._score(texts, refs, self.eval_rewards)
        correct = [[float(s > 0) for s in scores[i * n:(i + 1) * n]] for i in range(len(examples))]
        return correct, [len(o.token_ids) for outs in samples for o in outs]


def eval_metrics(correct: list[list[float]], lengths: list[int], n: int) -> dict[str, float]:
    """SPEC 7 metrics of per-problem correctness lists (however many nodes sampled them)."""
    from megahybrid.evaluation import avg_at_k, pass_at_1, pass_at_k

    out = {f"eval/avg@{n}": avg_at_k(correct), "eval/pass@1": pass_at_1(correct),
           f"eval/pass@{n}": pass_at_k(correct, n)}
    out["eval/accuracy"] = out[f"eval/avg@{n}"]
    out["eval/response_length"] = sum(lengths) / max(len(lengths), 1)
    return out


def light_batch(groups: list[Group]) -> Batch:
    """A token-free Batch of the groups' rewards (what dynamic-sampling filters look at)."""
    rows = [(g, s) for g, group in enumerate(groups) for s in group.sequences]
    return Batch(tokens=torch.zeros((len(rows), 1), dtype=torch.long),
                 response_mask=torch.zeros((len(rows), 1), dtype=torch.bool),
                 prompt_index=torch.tensor([g for g, _ in rows], dtype=torch.long),
                 is_demo=torch.tensor([s.is_demo for _, s in rows], dtype=torch.bool),
                 rewards=torch.tensor([s.reward for _, s in rows], dtype=torch.float32))


def filter_groups(groups: list[Group], keep_mask: torch.Tensor) -> list[Group]:
    """Drop the sequences the algorithm does not keep; drop groups left without rollouts."""
    out, i = [], 0
    for group in groups:
        kept = [s for s in group.sequences if keep_mask[(i := i + 1) - 1]]
        if any(not s.is_demo for s in kept) or (kept and not any(not s.is_demo for s in group.sequences)):
            group.sequences = kept
            out.append(group)
    return out
