"""Deterministic prompt order and the RNG state that exact resume needs."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


class PromptSampler:
    """Walks seeded per-epoch permutations of the training set. Its whole state is `position` (prompts consumed),
    so the same seed and position give the same prompts on every rank and after a resume."""

    def __init__(self, num_examples: int, *, seed: int, shuffle: bool = True):
        if num_examples < 1:
            raise ValueError("data.train: the training set is empty (after length filtering)")
        self.num_examples = num_examples
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0
        self._epoch = -1
        self._order: list[int] = []

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            order = list(range(self.num_examples))
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(self.num_examples, generator=gen).tolist()
            self._epoch, self._order = epoch, order
        return self._order

    def take(self, count: int) -> list[int]:
        out = []
        for _ in range(count):
            epoch, offset = divmod(self.position, self.num_examples)
            out.append(self._order_of(epoch)[offset])
            self.position += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
