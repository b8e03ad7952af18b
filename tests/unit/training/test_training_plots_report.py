"""Plots (valid PNGs, one per curve that some run has, missing keys tolerated) and comparison.md / result line
(expected values restated by hand from the records written here)."""
import json

import pytest
from PIL import Image

from megahybrid.training.plots import write_plots
from megahybrid.training.report import MethodResult, summarize_run, write_comparison

pytestmark = pytest.mark.timeout(60)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, metrics, evals):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    (run_dir / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return run_dir


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 100
        # Not a blank canvas: a plot has many colours (lines, text, anti-aliasing).
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 10


def test_comparison_plots_skip_curves_no_run_has(tmp_path):
    superrl = write_run(tmp_path / "superrl",
                        [{"step": s, "reward/mean": s / 30, "entropy/demo": 1.0, "superrl/sft_frac": 1 - s / 30}
                         for s in range(1, 31)],
                        [{"step": 0, "eval/accuracy": 0.0}, {"step": 30, "eval/accuracy": 0.7}])
    grpo = write_run(tmp_path / "grpo", [{"step": s, "reward/mean": 0.0} for s in range(1, 31)],
                     [{"step": 0, "eval/accuracy": 0.0}])
    written = write_plots({"superrl": superrl, "grpo": grpo}, tmp_path / "plots")
    assert sorted(p.name for p in written) == ["accuracy.png", "entropy.png", "reward.png", "sft_fraction.png"]
    for path in written:
        assert_png(path)


def test_plots_tolerate_missing_keys_and_files(tmp_path):
    run = write_run(tmp_path / "run", [{"step": 1, "loss/total": 1.0}, {"step": 2, "reward/mean": 0.5},
                                       {"step": 3, "reward/mean": None}], [])
    (run / "eval.jsonl").unlink()
    written = write_plots(run, tmp_path / "plots")
    assert [p.name for p in written] == ["reward.png"]
    assert_png(written[0])
    assert write_plots(tmp_path / "empty", tmp_path / "plots2") == []


def test_comparison_table_and_exact_last_line(tmp_path):
    results = [MethodResult("sft", 0.8125, 0.0, 0.4321, 1.0, 61.04, 40),
               MethodResult("grpo", 0.0, 0.0, None, None, 70.0, 40),
               MethodResult("srft", 0.66666, 0.01, 0.5, 0.25, 80.56, 40)]
    line = write_comparison(results, tmp_path / "out" / "comparison.md")
    assert line == "megahybrid compare: sft=0.812 grpo=0.000 srft=0.667"
    text = (tmp_path / "out" / "comparison.md").read_text()
    assert text.splitlines()[-1] == line
    assert "| sft | 0.812 | 0.000 | 0.432 | 1.000 | 61.0 | 40 |" in text
    assert "| grpo | 0.000 | 0.000 | n/a | n/a | 70.0 | 40 |" in text
    assert "| srft | 0.667 | 0.010 | 0.500 | 0.250 | 80.6 | 40 |" in text
    header = [c.strip() for c in text.splitlines()[2].strip("|").split("|")]
    assert header == ["method", "final accuracy", "step-0 accuracy", "mean entropy", "SFT fraction",
                      "wall time (s)", "steps"]
    with pytest.raises(ValueError, match="no method results"):
        write_comparison([], tmp_path / "x.md")


def test_summarize_run_from_records(tmp_path):
    run = write_run(tmp_path / "sasr",
                    [{"step": 1, "sasr/is_sft": 1.0, "entropy/demo": 2.0},
                     {"step": 2, "sasr/is_sft": 0.0, "entropy/rollout": 1.0, "entropy/pos": 3.0},
                     {"step": 3, "sasr/is_sft": 1.0, "entropy/mean": 0.5},
                     {"step": 4, "reward/mean": 1.0}],
                    [{"step": 0, "eval/accuracy": 0.05}, {"step": 2, "eval/accuracy": 0.3},
                     {"step": 4, "eval/accuracy": 0.625}])
    result = summarize_run("sasr", run, wall_s=12.5)
    assert result.method == "sasr" and result.steps == 4 and result.wall_s == 12.5
    assert result.final_accuracy == 0.625 and result.step0_accuracy == 0.05
    assert result.mean_entropy == pytest.approx((2.0 + (1.0 + 3.0) / 2 + 0.5) / 3)
    assert result.sft_fraction == pytest.approx(2 / 3)
    missing = summarize_run("none", tmp_path / "nothing", wall_s=0.0)
    assert (missing.final_accuracy, missing.mean_entropy, missing.steps) == (None, None, 0)
    assert write_comparison([missing], tmp_path / "c.md") == "megahybrid compare: none=nan"
