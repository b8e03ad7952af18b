"""MetricsLogger: JSONL resume truncation (reference: an uninterrupted run's files), TensorBoard read back with
tensorboard's own EventAccumulator, console fallback, W&B missing-package error."""
import io
import json
import sys
import time

import pytest

from megahybrid.config.schema import LoggingConfig
from megahybrid.training.metrics import MetricsLogger, entropy_value, read_jsonl, sft_fraction_value

pytestmark = pytest.mark.timeout(60)

QUIET = LoggingConfig(progress=False, tensorboard=False)


def step_metrics(step):
    return {"reward/mean": step / 10, "loss/total": 1.0 / step, "entropy/demo": 0.25 * step}


def eval_metrics(step):
    return {"eval/accuracy": step / 6, "eval/pass@1": step / 6}


def test_resume_truncation_matches_uninterrupted_run(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    with MetricsLogger(full, QUIET, total_steps=6) as log:
        log.log_eval(0, eval_metrics(0))
        for step in range(1, 7):
            log.log(step, step_metrics(step))
            if step % 3 == 0:
                log.log_eval(step, eval_metrics(step))

    # First attempt: checkpoint at step 3, then steps 4-5 (with other values) and a line cut short by a kill.
    with MetricsLogger(resumed, QUIET, total_steps=6) as log:
        log.log_eval(0, eval_metrics(0))
        for step in range(1, 6):
            log.log(step, step_metrics(step) if step <= 3 else {"reward/mean": 999.0})
            if step % 3 == 0:
                log.log_eval(step, eval_metrics(step))
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "reward/me')
    with MetricsLogger(resumed, QUIET, total_steps=6, start_step=3) as log:
        for step in range(4, 7):
            log.log(step, step_metrics(step))
            if step % 3 == 0:
                log.log_eval(step, eval_metrics(step))

    for name in ("metrics.jsonl", "eval.jsonl"):
        assert (resumed / name).read_bytes() == (full / name).read_bytes(), name
    # The content itself, restated by hand.
    assert [r["step"] for r in read_jsonl(full / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert read_jsonl(full / "metrics.jsonl")[3] == {"step": 4, "reward/mean": 0.4, "loss/total": 0.25,
                                                      "entropy/demo": 1.0}
    assert [r["step"] for r in read_jsonl(full / "eval.jsonl")] == [0, 3, 6]


def test_fresh_start_discards_old_records_and_steps_must_increase(tmp_path):
    with MetricsLogger(tmp_path, QUIET, total_steps=3) as log:
        log.log_eval(0, eval_metrics(0))
        log.log(1, step_metrics(1))
        log.log(2, step_metrics(2))
        with pytest.raises(ValueError, match="step 2 logged after step 2"):
            log.log(2, step_metrics(2))
        with pytest.raises(TypeError, match="'reward/mean'.*expected a number"):
            log.log(3, {"reward/mean": "high"})
        with pytest.raises(ValueError, match="reserved"):
            log.log(3, {"step": 1.0})
    with MetricsLogger(tmp_path, QUIET, total_steps=3, start_step=0) as log:
        log.log(1, {"reward/mean": float("nan")})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "reward/mean": None}]
    assert read_jsonl(tmp_path / "eval.jsonl") == []
    json.loads((tmp_path / "metrics.jsonl").read_text())  # strict JSON: no NaN literal


def test_read_jsonl_names_bad_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: not valid JSON"):
        read_jsonl(path)
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_disabled_rank_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "run", LoggingConfig(), total_steps=2, enabled=False)
    log.log(1, step_metrics(1))
    log.log_eval(1, eval_metrics(1))
    log.close()
    assert not (tmp_path / "run").exists()


def _next_second():
    # Event file names start with the integer wall-clock second; a resumed writer must sort after the first.
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.02)


def test_tensorboard_scalars_and_purge_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = LoggingConfig(progress=False, jsonl=False, tensorboard=True)
    with MetricsLogger(tmp_path, cfg, total_steps=5) as log:
        log.log_eval(0, {"eval/accuracy": 0.125})
        for step in range(1, 5):
            log.log(step, {"reward/mean": step / 4 if step <= 2 else -1.0, "kl/mean": 0.5})
    _next_second()
    with MetricsLogger(tmp_path, cfg, total_steps=5, start_step=2) as log:
        for step in range(3, 6):
            log.log(step, {"reward/mean": step / 4, "kl/mean": 0.5})

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    reward = [(e.step, e.value) for e in acc.Scalars("reward/mean")]
    assert reward == [(s, pytest.approx(s / 4)) for s in range(1, 6)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/accuracy")] == [(0, 0.125)]
    assert len(acc.Scalars("kl/mean")) == 5


def test_plain_console_lines_when_not_a_terminal(tmp_path):
    stream = io.StringIO()
    cfg = LoggingConfig(progress=True, jsonl=False, tensorboard=False)
    with MetricsLogger(tmp_path, cfg, total_steps=40, stream=stream) as log:
        log.log_eval(0, {"eval/accuracy": 0.5})
        for step in range(1, 41):
            log.log(step, {"reward/mean": 0.25})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 20  # every 40 // 20 = 2 steps, not one line per step
    assert lines[0].startswith("step 2/40 reward=0.250 acc=0.500 elapsed=")
    assert "eta=" in lines[0] and "\x1b" not in stream.getvalue()
    assert lines[-1].startswith("step 40/40 ")


def test_wandb_project_without_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # injected fault: the package is absent
    cfg = LoggingConfig(progress=False, tensorboard=False, wandb_project="megahybrid")
    with pytest.raises(RuntimeError, match="wandb_project is set to 'megahybrid'.*pip install wandb"):
        MetricsLogger(tmp_path, cfg, total_steps=1)


def test_entropy_and_sft_fraction_extraction():
    assert entropy_value({"entropy/mean": 2.0, "entropy/demo": 5.0}) == 2.0
    assert entropy_value({"entropy/demo": 1.0, "entropy/rollout": 2.0, "reward/mean": 9.0}) == 1.5
    assert entropy_value({"reward/mean": 1.0}) is None
    assert sft_fraction_value({"superrl/sft_frac": 0.25}) == 0.25
    assert sft_fraction_value({"sasr/is_sft": 1}) == 1.0
    assert sft_fraction_value({"loss/total": 1.0}) is None


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_rich_progress_bar_on_a_terminal(tmp_path):
    stream = _Terminal()
    cfg = LoggingConfig(progress=True, jsonl=False, tensorboard=False)
    with MetricsLogger(tmp_path, cfg, total_steps=4, start_step=1, stream=stream) as log:
        for step in range(2, 5):
            log.log(step, {"reward/mean": 0.75, "eval/accuracy": 0.5})
    out = stream.getvalue()
    assert "4/4" in out and "reward=0.750" in out and "acc=0.500" in out and "eta=0:00:00" in out
    assert "step 4/4" not in out  # no plain fallback lines on a terminal


def test_disk_full_mid_record_leaves_earlier_lines_whole(tmp_path, monkeypatch, capsys):
    """A full disk accepts part of a write, then refuses the rest (what tmpfs/ext4 do with ENOSPC). The fake
    os.write injects exactly that; the e2e test in tests/e2e/test_reliability.py fills a real tmpfs."""
    import errno
    import os

    from megahybrid.training import metrics as metrics_module

    logger = MetricsLogger(tmp_path, QUIET, total_steps=5)
    for step in (1, 2):
        logger.log(step, step_metrics(step))
    before = (tmp_path / "metrics.jsonl").read_bytes()
    real_write, calls = os.write, []

    def full_disk(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(metrics_module.os, "write", full_disk)
    with pytest.raises(metrics_module.MetricsWriteError, match="No space left on device"):
        logger.log(3, step_metrics(3))
    assert (tmp_path / "metrics.jsonl").read_bytes() == before  # the half line is gone, earlier ones untouched
    assert "could not write the record of step 3" in capsys.readouterr().err
    monkeypatch.setattr(metrics_module.os, "write", real_write)
    logger.log(3, step_metrics(3))  # space is back: the same step can be written again
    logger.close()  # nothing buffered from the failed write is appended on close
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
