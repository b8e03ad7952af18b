"""What the trainer sends to and gets back from a rollout engine (no vLLM import here)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from megahybrid.config.schema import RolloutConfig


class RolloutError(RuntimeError):
    """A rollout request that cannot be answered (engine error, or retries exhausted)."""


def derive_seed(seed: int, prompt_index: int) -> int:
    """Per-request seed of prompt `prompt_index` (global index in the call).

    Hashed so that nearby base seeds (consecutive steps) give unrelated streams; 48 bits leave room for vLLM's
    `seed + sample_index` of the n samples of one request.
    """
    digest = hashlib.blake2b(f"{seed}:{prompt_index}".encode(), digest_size=6).digest()
    return int.from_bytes(digest, "big")


@dataclass
class SamplingOptions:
    """Sampling of one generate call."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 = off."""
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    """Stop strings (kept at the end of the text and token ids, so text and tokens agree)."""
    seed: int | None = None
    """Base seed: prompt i samples with `derive_seed(seed, i)`, so results do not depend on sharding or
    batching; None = unseeded (not reproducible)."""
    logprobs: bool = True
    """Return the engine's log-prob of every sampled token (raw model distribution, before temperature)."""

    @classmethod
    def from_config(cls, cfg: RolloutConfig, *, seed: int | None = None, **overrides) -> "SamplingOptions":
        base = cls(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                   max_new_tokens=cfg.max_new_tokens, stop=list(cfg.stop), seed=seed)
        for k, v in overrides.items():
            setattr(base, k, v)
        return base

    def request_seeds(self, num_prompts: int, offset: int = 0) -> list[int | None]:
        """Seeds of prompts offset .. offset + num_prompts - 1."""
        if self.seed is None:
            return [None] * num_prompts
        return [derive_seed(self.seed, offset + i) for i in range(num_prompts)]


@dataclass
class RolloutSample:
    """One sampled response."""

    token_ids: list[int]
    """Response token ids (EOS included when the engine stopped on it)."""
    logprobs: list[float]
    """Engine log-prob of each token of `token_ids` (empty when sampling.logprobs is False)."""
    finish_reason: str
    """`stop` (EOS or stop string) or `length` (max_new_tokens reached)."""
    text: str
    """Detokenized response (special tokens skipped)."""


class RolloutEngine(Protocol):
    """A rollout engine: one vLLM instance (VLLMEngine) or a pool of engine processes (RolloutPool)."""

    def generate(self, prompt_token_ids: list[list[int]], n: int,
                 sampling: SamplingOptions) -> list[list[RolloutSample]]:
        """n samples for each prompt, in prompt order: result[i][j] is sample j of prompt i."""
        ...

    def update_weights(self, source: str | dict[str, Tensor]) -> object:
        """Load new policy weights (Hugging Face names): a folder of safetensors, or named tensors."""
        ...

    def health(self) -> dict:
        ...

    def close(self) -> None:
        ...
