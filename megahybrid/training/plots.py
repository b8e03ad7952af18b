"""PNG curves of one run or several runs on shared axes (method comparisons): reward, held-out accuracy, entropy
and SFT fraction against the training step. A curve that no run logged is skipped; missing keys never fail."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from megahybrid.training.metrics import (ACCURACY_KEY, EVAL_FILE, METRICS_FILE, REWARD_KEY, entropy_value, read_jsonl,
                                         sft_fraction_value)

Extract = Callable[[dict[str, Any]], "float | None"]


def _key(name: str) -> Extract:
    def get(record: dict[str, Any]) -> float | None:
        value = record.get(name)
        return float(value) if isinstance(value, (int, float)) else None
    return get


# (file name, y label, records file, value of a record)
CURVES: tuple[tuple[str, str, str, Extract], ...] = (
    ("reward.png", "mean reward", METRICS_FILE, _key(REWARD_KEY)),
    ("accuracy.png", "held-out accuracy", EVAL_FILE, _key(ACCURACY_KEY)),
    ("entropy.png", "mean token entropy (nats)", METRICS_FILE, entropy_value),
    ("sft_fraction.png", "SFT fraction", METRICS_FILE, sft_fraction_value),
)


def curve(records: list[dict[str, Any]], extract: Extract) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that have a finite value."""
    steps, values = [], []
    for record in records:
        value = extract(record)
        if value is not None and value == value and "step" in record:
            steps.append(int(record["step"]))
            values.append(value)
    return steps, values


def _smooth(values: list[float]) -> list[float]:
    """Trailing moving average over ~5% of the points: per-step RL curves are noisy."""
    window = max(1, len(values) // 20)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def write_plots(run_dirs: dict[str, Path] | Path, out_dir: Path) -> list[Path]:
    """One PNG per curve that at least one run has; runs keyed by label (a single run dir is labelled by its
    name). Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    runs = {Path(run_dirs).name: Path(run_dirs)} if isinstance(run_dirs, (str, Path)) else dict(run_dirs)
    records = {label: {name: read_jsonl(Path(d) / name) for name in (METRICS_FILE, EVAL_FILE)}
               for label, d in runs.items()}
    # a method keeps its colour and dash across the figures; past matplotlib's 10 colours the dash tells them apart
    styles = {label: (f"C{i % 10}", ("-", "--", ":")[i // 10 % 3]) for i, label in enumerate(runs)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, ylabel, source, extract in CURVES:
        lines = {label: curve(recs[source], extract) for label, recs in records.items()}
        lines = {label: xy for label, xy in lines.items() if xy[0]}
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for label, (steps, values) in lines.items():
            color, dash = styles[label]
            smoothed = source == METRICS_FILE and len(values) > 20
            ax.plot(steps, values, color=color, linestyle=dash, alpha=0.3 if smoothed else 1.0,
                    marker="o" if source == EVAL_FILE or len(values) == 1 else None, label=None if smoothed else label)
            if smoothed:
                ax.plot(steps, _smooth(values), color=color, linestyle=dash, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
