"""Token ids and masks for (prompt, response) pairs, and length filtering.

Prompt and response are tokenized separately and concatenated, so the response tokens are exactly the ones
the rollout engine produced (it only ever sees prompt token ids) and the masks line up with no offset
arithmetic. The response ends with EOS when `add_eos` (demos; rollouts keep the engine's own tokens).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from megahybrid.data.records import DataError, Example
from megahybrid.data.templates import render_prompt


@dataclass
class EncodedPair:
    """One sequence: `token_ids = prompt ids + response ids`; masks are aligned with token_ids."""

    token_ids: list[int]
    prompt_mask: list[bool]
    response_mask: list[bool]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(self.prompt_mask)


def encode_prompt(tokenizer: Any, prompt_text: str, *, chat: bool = False) -> list[int]:
    """Prompt token ids exactly as the tokenizer's own conventions give them.

    `chat`: the text came from `apply_chat_template`, which already holds every special token the model expects
    (SmolLM2's and Qwen's templates start with their BOS-like `<|im_start|>`), so nothing is added; the ids equal
    `apply_chat_template(..., tokenize=True)`. Plain text: BOS is prefixed only when the tokenizer itself prefixes
    it (`tokenizer(text)`; Llama-style tokenizers and our char tokenizer do, SmolLM2 and Qwen do not). Adding a
    BOS unconditionally gave `[1, 1, 9690, ...]` under SmolLM2's template, a prefix the model never saw.
    Trailing specials a tokenizer may append (EOS) are never taken: the response follows the prompt.
    """
    ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    if chat or bos is None or (ids and ids[0] == bos):
        return ids
    with_specials = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    return [bos] + ids if with_specials and with_specials[0] == bos else ids


def prompt_token_ids(tokenizer: Any, question: str, template: str) -> tuple[str, list[int]]:
    """The rendered prompt text for `question` under `template` (DataConfig.template) and its token ids: the one
    place the trainer, the engines and the length filter get prompt ids from."""
    text = render_prompt(question, template, tokenizer)
    return text, encode_prompt(tokenizer, text, chat=template == "chat")


def encode_pair(tokenizer: Any, prompt_text: str, response: str | list[int], *, chat: bool = False,
                add_eos: bool = True) -> EncodedPair:
    """Token ids + prompt/response masks. `response` is text (a demo) or engine token ids (a rollout)."""
    p = encode_prompt(tokenizer, prompt_text, chat=chat)
    r = list(response) if not isinstance(response, str) else tokenizer.encode(response, add_special_tokens=False)
    if add_eos and tokenizer.eos_token_id is not None and (not r or r[-1] != tokenizer.eos_token_id):
        r = r + [tokenizer.eos_token_id]
    return EncodedPair(p + r, [True] * len(p) + [False] * len(r), [False] * len(p) + [True] * len(r))


def pad_pairs(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest: `tokens` [S, T] long, `prompt_mask` / `response_mask` / `attention_mask` [S, T] bool."""
    T = max((len(p.token_ids) for p in pairs), default=0)
    S = len(pairs)
    tokens = torch.full((S, T), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((S, T), dtype=torch.bool)
    response_mask = torch.zeros((S, T), dtype=torch.bool)
    attention_mask = torch.zeros((S, T), dtype=torch.bool)
    for i, p in enumerate(pairs):
        n = len(p.token_ids)
        tokens[i, :n] = torch.tensor(p.token_ids, dtype=torch.long)
        prompt_mask[i, :n] = torch.tensor(p.prompt_mask)
        response_mask[i, :n] = torch.tensor(p.response_mask)
        attention_mask[i, :n] = True
    return {"tokens": tokens, "prompt_mask": prompt_mask, "response_mask": response_mask,
            "attention_mask": attention_mask}


def filter_by_length(examples: list[Example], tokenizer: Any, *, template: str = "plain",
                     max_prompt_tokens: int, max_demo_tokens: int, overlong_prompts: str = "drop"
                     ) -> tuple[list[Example], dict[str, float]]:
    """Drop examples whose templated prompt exceeds `max_prompt_tokens` (`overlong_prompts="error"`: raise
    DataError naming the record's file:line instead); drop demos (incl. EOS) longer than `max_demo_tokens` from
    the examples kept. Returns the kept examples (copies) and counters `data/filtered_prompts`,
    `data/filtered_demos`, `data/kept_prompts`."""
    kept: list[Example] = []
    num_prompts = num_demos = 0
    eos = 0 if tokenizer.eos_token_id is None else 1
    for ex in examples:
        num_tokens = len(prompt_token_ids(tokenizer, ex.prompt, template)[1])
        if num_tokens > max_prompt_tokens:
            if overlong_prompts == "error":
                raise _overlong(ex, num_tokens, template, max_prompt_tokens)
            num_prompts += 1
            continue
        demos = [d for d in ex.demos if len(tokenizer.encode(d, add_special_tokens=False)) + eos <= max_demo_tokens]
        num_demos += len(ex.demos) - len(demos)
        kept.append(dataclasses.replace(ex, demos=demos))
    return kept, {"data/filtered_prompts": float(num_prompts), "data/filtered_demos": float(num_demos),
                  "data/kept_prompts": float(len(kept))}


def _overlong(ex: Example, num_tokens: int, template: str, limit: int) -> DataError:
    file, _, line = ex.location.rpartition(":")
    where = (file, int(line)) if file and line.isdigit() else (ex.source or "data", None)
    return DataError(*where, "prompt", f"{num_tokens} tokens under the {template!r} template, more than "
                     f"data.max_prompt_tokens={limit} (raise it, or set data.overlong_prompts: drop)")
