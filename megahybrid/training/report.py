"""`comparison.md` of a method comparison and the exact result line `megahybrid compare: <method>=<acc> ...`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from megahybrid.training.metrics import (ACCURACY_KEY, EVAL_FILE, METRICS_FILE, entropy_value, read_jsonl,
                                         sft_fraction_value)


@dataclass
class MethodResult:
    """The summary of one method's run. None = not measured (shown as `n/a`)."""

    method: str
    final_accuracy: float | None
    step0_accuracy: float | None
    mean_entropy: float | None
    sft_fraction: float | None
    wall_s: float
    steps: int


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return sum(present) / len(present) if present else None


def summarize_run(method: str, run_dir: Path, wall_s: float) -> MethodResult:
    """A MethodResult from a run directory's metrics.jsonl / eval.jsonl: accuracy of the last and of the step-0
    evaluation, entropy and SFT fraction averaged over the training steps that logged them."""
    metrics = read_jsonl(Path(run_dir) / METRICS_FILE)
    evals = [r for r in read_jsonl(Path(run_dir) / EVAL_FILE) if r.get(ACCURACY_KEY) is not None]
    step0 = [r for r in evals if r.get("step") == 0]
    return MethodResult(
        method=method,
        final_accuracy=float(evals[-1][ACCURACY_KEY]) if evals else None,
        step0_accuracy=float(step0[0][ACCURACY_KEY]) if step0 else None,
        mean_entropy=_mean([entropy_value(r) for r in metrics]),
        sft_fraction=_mean([sft_fraction_value(r) for r in metrics]),
        wall_s=float(wall_s),
        steps=max((int(r["step"]) for r in metrics if "step" in r), default=0),
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def result_line(results: list[MethodResult]) -> str:
    """`megahybrid compare: sft=0.812 grpo=0.000 ...` (accuracies with 3 decimals, `nan` when not evaluated)."""
    accs = " ".join(f"{r.method}={r.final_accuracy if r.final_accuracy is not None else math.nan:.3f}"
                    for r in results)
    return f"megahybrid compare: {accs}"


def write_comparison(results: list[MethodResult], out_path: Path) -> str:
    """Write the markdown table to `out_path` and return the result line (also the file's last line)."""
    if not results:
        raise ValueError("write_comparison: no method results to compare")
    rows = ["| method | final accuracy | step-0 accuracy | mean entropy | SFT fraction | wall time (s) | steps |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        rows.append(f"| {r.method} | {_fmt(r.final_accuracy)} | {_fmt(r.step0_accuracy)} | {_fmt(r.mean_entropy)} "
                    f"| {_fmt(r.sft_fraction)} | {r.wall_s:.1f} | {r.steps} |")
    line = result_line(results)
    text = "# Method comparison\n\n" + "\n".join(rows) + "\n\n" + line + "\n"
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text, encoding="utf-8")
    return line
