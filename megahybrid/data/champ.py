"""`champ-dataset` adapter: 270 competition problems with step-by-step solutions and final answers.

Reads `champ_dataset/dataset_files/v0.json` directly (the package's own loader pulls in extra machinery).
Each problem becomes an Example with `steps` (the solution's step texts) and one demo that numbers the steps
inside a think block and boxes the answer. The eval split is a fixed, seeded fifth of the problems.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from megahybrid.data.records import DataError, Example


def champ_path() -> Path:
    try:
        import champ_dataset
    except ImportError as exc:
        raise ImportError("builtin:champ needs the `champ-dataset` package (pip install champ-dataset)") from exc
    return Path(champ_dataset.__file__).parent / "dataset_files" / "v0.json"


def champ_demo(steps: list[str], answer: str) -> str:
    body = "\n".join(f"{i}. {s}" for i, s in enumerate(steps, start=1))
    return f"<think>\n{body}\n</think>\nThe answer is \\boxed{{{answer}}}."


def load_champ(split: str = "train", *, path: str | Path | None = None) -> list[Example]:
    """All problems of `split` (train: 4/5, eval: 1/5; fixed by identifier, independent of any run seed)."""
    path = Path(path) if path is not None else champ_path()
    problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    ids = sorted(problems)
    random.Random("champ-split").shuffle(ids)
    held_out = set(ids[: len(ids) // 5])
    out = []
    for pid in sorted(problems):
        if (pid in held_out) != (split == "eval"):
            continue
        p = problems[pid]
        try:
            steps = [s["_text"] for s in p["solution"]["steps"]]
            question, answer = p["_text"], p["_answer"]
        except (KeyError, TypeError) as exc:
            raise DataError(str(path), None, f"problems.{pid}", f"unexpected structure ({exc!r})") from exc
        out.append(Example(prompt=question, answer=answer, demos=[champ_demo(steps, answer)], steps=steps,
                           source="builtin:champ", meta={"id": pid, "category": p.get("category")}))
    return out
