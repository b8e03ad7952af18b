"""Pure-string answer / action extraction (SPEC 6, 9). Linear time in the text length, no regex backtracking
on untrusted text, no evaluation of anything."""
from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_BOXED = re.compile(r"\\boxed\s*\{")
_BRACE = re.compile(r"[{}]")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answer_region(text: str) -> str:
    """The text after the final `</think>` (the whole text if there is none)."""
    i = text.rfind(THINK_CLOSE)
    return text if i < 0 else text[i + len(THINK_CLOSE):]


def _matching_braces(text: str, start: int) -> dict[int, int]:
    """Position of each `{` at or after `start` -> position of its matching `}` (one stack pass over the braces
    only; unmatched `{` absent). Braces before `start` cannot change how later braces pair up."""
    stack, match = [], {}
    for m in _BRACE.finditer(text, start):
        i = m.start()
        if text[i] == "{":
            stack.append(i)
        elif stack:
            match[stack.pop()] = i
    return match


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces balance, or None."""
    starts = [m.end() - 1 for m in _BOXED.finditer(text)]  # positions of the opening braces
    if not starts:
        return None
    match = _matching_braces(text, starts[0])
    for open_at in reversed(starts):
        if open_at in match:
            return text[open_at + 1: match[open_at]]
    return None


def extract_answer(text: str) -> str | None:
    """SPEC 9: the last balanced `\\boxed{}` after the final `</think>`, else the last number there, else None."""
    region = answer_region(text)
    boxed = last_boxed(region)
    if boxed is not None:
        return boxed.strip()
    last = None
    for last in _NUMBER.finditer(region):
        pass
    return None if last is None else last.group(0)


def extract_action(text: str, *, require_think: bool = True) -> str | None:
    """SRL action (SPEC 4.6 / 9): text after the last `</think>`, stripped; None for a bad format.

    Bad format: no `</think>`; with `require_think`, no `<think>` before it; an empty action.
    """
    close = text.rfind(THINK_CLOSE)
    if close < 0:
        return None
    if require_think and text.rfind(THINK_OPEN, 0, close) < 0:
        return None
    action = text[close + len(THINK_CLOSE):].strip()
    return action or None


def has_think_block(text: str, *, opened_in_prompt: bool = False) -> bool:
    """`format`: the response is one `<think>...</think>` block followed by a non-empty answer.

    Exactly one `<think>` (at the start, after whitespace) and one `</think>` after it; with
    `opened_in_prompt` (chat templates that end the prompt with `<think>`), no `<think>` at all.
    """
    n_open, n_close = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    if n_close != 1 or n_open != (0 if opened_in_prompt else 1):
        return False
    if not opened_in_prompt and not text.lstrip().startswith(THINK_OPEN):
        return False
    return bool(text[text.find(THINK_CLOSE) + len(THINK_CLOSE):].strip())
