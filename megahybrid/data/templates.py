"""Prompt templates: plain, SRFT (Figure A3), SuperRL (Appendix C.4) and the tokenizer's own chat template.

`render_prompt` returns the text the model sees before its response; the response (rollout or demo) is
appended right after it, so tokenizing prompt and response separately gives exact masks (see tokenize.py).
"""
from __future__ import annotations

from typing import Any

SRFT_TEMPLATE = (
    "Your task is to follow a systematic, thorough reasoning process before providing the final solution. "
    "This involves analyzing, summarizing, exploring, reassessing, and refining your thought process through "
    "multiple iterations. Structure your response into two sections: **Thought** and **Solution**.\n\n"
    "In the **Thought** section, present your reasoning using the format: \u201c<think>\\n {thoughts}</think>\\n\u201d. "
    "Each thought should include detailed analysis, brainstorming, verification, and refinement of ideas.\n\n"
    "After \u201c</think>\\n\u201d in the **Solution** section, provide the final, logical, and accurate answer, "
    "clearly derived from the exploration in the **Thought** section.\n\n"
    "If applicable, include the Answer in `\\boxed{ }` for closed-form results like multiple choices or "
    "mathematical solutions.\n\n"
    "**Question:** {question}\n\n"
    "**Answer:** "
)
"""SRFT paper Figure A3 ("Chat template for all training paradigms"); the response follows `**Answer:** `."""

SUPERRL_SUFFIX = "Let's think step by step and output the final answer in \\boxed{}."
"""SuperRL Appendix C.4: appended to the problem text."""

TEMPLATES = ("plain", "srft", "superrl", "chat")


def render_prompt(question: str, template: str = "plain", tokenizer: Any = None, *,
                  system: str | None = None) -> str:
    """The prompt text for `question` under `template` (DataConfig.template).

    `chat` uses `tokenizer.apply_chat_template` with a generation prompt (and `system` as a system turn);
    the other templates are plain text and ignore the tokenizer.
    """
    if template == "plain":
        return question
    if template == "srft":
        # str.replace, not str.format: the template itself contains literal braces
        return SRFT_TEMPLATE.replace("{question}", question)
    if template == "superrl":
        return f"{question} {SUPERRL_SUFFIX}"
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.template: 'chat' needs a tokenizer with a chat template")
        turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"data.template: expected one of {', '.join(TEMPLATES)}, got {template!r}")
