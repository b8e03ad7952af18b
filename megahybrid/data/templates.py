"""Prompt templates: plain, SRFT (Figure A3), SuperRL (Appendix C.4) and the tokenizer's own chat template.

`render_prompt` returns the text the model sees before its response; the response (rollout or demo) is
appended right after it, so tokenizing prompt and response separately gives exact masks (see tokenize.py).
"""
from __future__ import annotations

from typing import Any

SRFT_SYSTEM = (
    "Your task is to follow a systematic, thorough reasoning process before providing the final solution. "
    "This involves analyzing, summarizing, exploring, reassessing, and refining your thought process through "
    "multiple iterations. Structure your response into two sections: **Thought** and **Solution**.\n\n"
    "In the **Thought** section, present your reasoning using the format: \u201c<think>\\n {thoughts}</think>\\n\u201d. "
    "Each thought should include detailed analysis, brainstorming, verification, and refinement of ideas.\n\n"
    "After \u201c</think>\\n\u201d in the **Solution** section, provide the final, logical, and accurate answer, "
    "clearly derived from the exploration in the **Thought** section.\n\n"
    "If applicable, include the Answer in `\\boxed{ }` for closed-form results like multiple choices or "
    "mathematical solutions."
)
"""SRFT paper Figure A3, the instruction part (the system turn when the prompt goes through a chat template)."""
SRFT_TEMPLATE = SRFT_SYSTEM + "\n\n**Question:** {question}\n\n**Answer:** "
"""SRFT paper Figure A3 as one text ("Chat template for all training paradigms"); the response follows
`**Answer:** `."""

SUPERRL_SUFFIX = "Let's think step by step and output the final answer in \\boxed{}."
"""SuperRL Appendix C.4: appended to the problem text."""

TEMPLATES = ("plain", "srft", "superrl", "chat")


def render_prompt(question: str, template: str = "plain", tokenizer: Any = None, *,
                  system: str | None = None, chat: bool = False) -> str:
    """The prompt text for `question` under `template` (DataConfig.template).

    `chat` (always on for template `chat`) wraps the prompt in `tokenizer.apply_chat_template` with a generation
    prompt: `srft` then puts the Figure A3 instructions in the system turn and the question in the user turn (how
    LUFFY/SRFT feed Qwen2.5-Math), `superrl` puts question + instruction in the user turn. Without `chat`,
    templates are plain text and ignore the tokenizer. `system` overrides the system turn.
    """
    if template not in TEMPLATES:
        raise ValueError(f"data.template: expected one of {', '.join(TEMPLATES)}, got {template!r}")
    if template == "superrl":
        question = f"{question} {SUPERRL_SUFFIX}"
    if not (chat or template == "chat"):
        # str.replace, not str.format: the template itself contains literal braces
        return SRFT_TEMPLATE.replace("{question}", question) if template == "srft" else question
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"data.template: {template!r} through a chat template needs a tokenizer that has one")
    system = system if system is not None else (SRFT_SYSTEM if template == "srft" else None)
    turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
