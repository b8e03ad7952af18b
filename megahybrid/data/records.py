"""The typed training record and the error every loader raises for a bad row."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    """One problem: what the policy is asked, what counts as correct, and optional expert material."""

    prompt: str
    """The question text, before any template is applied."""
    answer: str
    """Ground-truth final answer (math reward) or the expert step (SRL instances)."""
    demos: list[str] = field(default_factory=list)
    """Expert responses (full text the model should produce after the prompt, e.g. `<think>..</think>\\boxed{..}`)."""
    steps: list[str] | None = None
    """Expert solution split into steps (SRL); None when the source has no step structure."""
    source: str = ""
    """Where the record came from (`builtin:arith`, a file name, a dataset's data_source)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything else the source carried (ids, categories, SRL step index)."""
    location: str = ""
    """`file:line` (Parquet: row number) the record was read from, for error messages; empty when generated."""


class DataError(ValueError):
    """A bad data row: names the file, the line (1-based; parquet: row number) and the field."""

    def __init__(self, file: str, line: int | None, field_name: str | None, problem: str):
        self.file, self.line, self.field, self.problem = file, line, field_name, problem
        where = file if line is None else f"{file}:{line}"
        what = f" field {field_name!r}" if field_name else ""
        super().__init__(f"{where}:{what} {problem}")


@dataclass
class LoadStats:
    """Counters of one load (reported as metrics; `skip_bad_rows` never skips silently)."""

    num_rows: int = 0
    """Rows read."""
    num_bad_rows: int = 0
    """Rows skipped as malformed (only with skip_bad_rows)."""
    errors: list[str] = field(default_factory=list)
    """The first few skip messages (file:line: field ...)."""

    def add_bad(self, err: DataError, keep: int = 20) -> None:
        self.num_bad_rows += 1
        if len(self.errors) < keep:
            self.errors.append(str(err))

    def as_metrics(self) -> dict[str, float]:
        return {"data/rows": float(self.num_rows), "data/bad_rows": float(self.num_bad_rows)}
