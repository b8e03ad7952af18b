"""Metrics sinks of a run (rank 0): `metrics.jsonl` / `eval.jsonl`, TensorBoard, optional W&B, console progress.

Step convention (shared with checkpoint directories `step_XXXXXX`): a training record's `step` is the number of
optimizer steps completed after it (1, 2, ...); evaluation before training is step 0. A run resumed from the
checkpoint of step k passes `start_step=k`: records with step > k are dropped from both JSONL files and purged from
TensorBoard, so the files of a resumed run equal those of an uninterrupted one. For that to hold the trainer logs
step k (and its evaluation, if due) before it commits the checkpoint of step k. `start_step=0` is a fresh start:
earlier records in the run directory are discarded.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from megahybrid.config.schema import LoggingConfig
from megahybrid.training.run_dir import atomic_write_text

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id.txt"

REWARD_KEY = "reward/mean"
ACCURACY_KEY = "eval/accuracy"
ENTROPY_KEY = "entropy/mean"
ENTROPY_PREFIX = "entropy/"
SFT_FRACTION_KEYS = ("train/sft_frac", "superrl/sft_frac", "sasr/is_sft", "srft/sft_frac")
"""Keys read as a step's SFT fraction, first present wins (SASR's 0/1 step choice averages to the SFT-step share)."""


# ----------------------------------------------------------------------------------------------- reading records
def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file (missing file: []). A final line without its newline is a write cut short by a
    crash and is left out; any other line that is not a JSON object raises ValueError naming file:line."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete = lines[:-1]  # the element after the last "\n" is "" or an unfinished line
    records = []
    for lineno, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}): {line[:80]!r}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def entropy_value(record: dict[str, Any]) -> float | None:
    """A step's entropy: `entropy/mean` if logged, else the mean of the available `entropy/*` group means."""
    if _finite(record.get(ENTROPY_KEY)) is not None:
        return float(record[ENTROPY_KEY])
    values = [_finite(v) for k, v in record.items() if k.startswith(ENTROPY_PREFIX)]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def sft_fraction_value(record: dict[str, Any]) -> float | None:
    """A step's SFT fraction: the first of SFT_FRACTION_KEYS present in the record."""
    for key in SFT_FRACTION_KEYS:
        value = _finite(record.get(key))
        if value is not None:
            return value
    return None


# ----------------------------------------------------------------------------------------------- JSONL files
def _json_value(key: str, value: Any) -> float | None:
    """A metric as a JSON number; non-finite values become null (strict JSON has no NaN)."""
    try:
        number = float(value)  # ints, bools, numpy scalars, 0-d torch tensors
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__} {value!r}") from None
    return number if math.isfinite(number) else None


def _truncate_jsonl(path: Path, keep_through: int | None) -> int | None:
    """Keep only records with step <= keep_through (None: keep none), rewritten atomically. Returns the last
    kept step."""
    records = [r for r in read_jsonl(path) if keep_through is not None and r.get("step", -1) <= keep_through]
    if path.exists():
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records[-1]["step"] if records else None


class MetricsWriteError(OSError):
    """A metrics record could not be written (ENOSPC, EDQUOT, EIO, ...); the file was left as it was before."""


class _JsonlSink:
    """Append-only JSONL file; each record is written whole or not at all, then fsynced.

    Unbuffered (an fd, not a text file): after a failed write nothing stays in a buffer that a later flush or
    close would append. A write that fails part-way (disk full) is cut back to the last whole record, so the file
    never holds a half line and earlier records are untouched.
    """

    def __init__(self, path: Path, start_step: int):
        self.path = path
        self.last_step = _truncate_jsonl(path, start_step if start_step > 0 else None)
        self.fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"{self.path}: step {step} logged after step {self.last_step}; steps must increase "
                             f"(a resumed run passes start_step so earlier records are truncated)")
        if "step" in metrics:
            raise ValueError(f"{self.path}: metric key 'step' is reserved for the record's step number")
        record = {"step": int(step), **{k: _json_value(k, v) for k, v in metrics.items()}}
        data = (json.dumps(record) + "\n").encode("utf-8")
        end = os.fstat(self.fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]  # a full disk can accept part of a write
            os.fsync(self.fd)
        except OSError as e:
            try:
                os.ftruncate(self.fd, end)
            except OSError:
                pass  # the reader (read_jsonl) still drops a final line without its newline
            message = (f"could not write the record of step {step} to {self.path}: {e.strerror or e}. "
                       f"Earlier records are intact; free space and run again (resume: auto continues from the "
                       f"newest complete checkpoint)")
            print(f"[megahybrid] {message}", file=sys.stderr, flush=True)
            raise MetricsWriteError(e.errno, message) from e
        self.last_step = step

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------------------------- TensorBoard / W&B
def _tensorboard_writer(log_dir: Path, start_step: int):
    from torch.utils.tensorboard import SummaryWriter

    # purge_step hides events with step >= purge_step left by the interrupted run (step > start_step).
    return SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step > 0 else 0)


def _wandb_run(run_dir: Path, project: str):
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError(f"logging.wandb_project is set to {project!r} but the `wandb` package is not installed: "
                           f"`pip install wandb`, or set logging.wandb_project: null") from e
    # A stable id kept in the run directory lets a resumed run continue the same W&B run.
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id + "\n")
    return wandb.init(project=project, dir=str(run_dir), id=run_id, resume="allow", name=run_dir.name)


# ----------------------------------------------------------------------------------------------- console
def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Console:
    """A rich progress bar on a terminal; otherwise one compact plain line every `every` steps (CI logs)."""

    def __init__(self, stream: TextIO, total_steps: int, start_step: int):
        from rich.console import Console

        self.stream, self.total, self.start_step = stream, total_steps, start_step
        self.t0 = time.monotonic()
        self.accuracy: float | None = None
        self.every = max(1, total_steps // 20)
        self.progress = None
        console = Console(file=stream)
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), console=console)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()

    def info(self, step: int, reward: float | None) -> str:
        elapsed = time.monotonic() - self.t0
        done = step - self.start_step
        parts = [] if reward is None else [f"reward={reward:.3f}"]
        if self.accuracy is not None:
            parts.append(f"acc={self.accuracy:.3f}")
        parts.append(f"elapsed={_hms(elapsed)}")
        if done > 0:
            parts.append(f"eta={_hms(elapsed / done * (self.total - step))}")
        return " ".join(parts)

    def update(self, step: int, reward: float | None) -> None:
        info = self.info(step, reward)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total} {info}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# ----------------------------------------------------------------------------------------------- the logger
class MetricsLogger:
    """All metric sinks of a run behind `log` / `log_eval` / `close`. Construct it on every rank with
    `enabled=(rank == 0)`: on other ranks every method does nothing and no file is touched.

    `stream`: where the console progress goes (default stderr, keeping stdout for the run's result lines).
    """

    def __init__(self, run_dir: Path, cfg: LoggingConfig, *, total_steps: int, start_step: int = 0,
                 enabled: bool = True, stream: TextIO | None = None):
        self.enabled = enabled
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = _JsonlSink(self.run_dir / METRICS_FILE, start_step) if cfg.jsonl else None
        self.evals = _JsonlSink(self.run_dir / EVAL_FILE, start_step) if cfg.jsonl else None
        self.tb = _tensorboard_writer(self.run_dir / TENSORBOARD_DIR, start_step) if cfg.tensorboard else None
        self.wandb = _wandb_run(self.run_dir, cfg.wandb_project) if cfg.wandb_project else None
        self.console = _Console(stream or sys.stderr, total_steps, start_step) if cfg.progress else None

    def _scalars(self, step: int, metrics: dict[str, Any]) -> None:
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, float(value), global_step=step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: float(v) for k, v in metrics.items()}, step=step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One training step's metrics (keys `section/name`, numeric values)."""
        if not self.enabled:
            return
        if self.metrics is not None:
            self.metrics.write(step, metrics)
        self._scalars(step, metrics)
        if self.console is not None:
            reward = metrics.get(REWARD_KEY)
            if ACCURACY_KEY in metrics:
                self.console.accuracy = float(metrics[ACCURACY_KEY])
            self.console.update(step, None if reward is None else float(reward))

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        """Held-out evaluation at `step` (keys like `eval/accuracy`, `eval/pass@k`) into eval.jsonl."""
        if not self.enabled:
            return
        if self.evals is not None:
            self.evals.write(step, metrics)
        self._scalars(step, metrics)
        if self.console is not None and ACCURACY_KEY in metrics:
            self.console.accuracy = float(metrics[ACCURACY_KEY])

    def close(self) -> None:
        if not self.enabled:
            return
        for sink in (self.metrics, self.evals, self.tb, self.console):
            if sink is not None:
                sink.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.enabled = False

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
