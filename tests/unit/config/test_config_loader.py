"""Config system: inheritance, overrides, strict keys with did-you-mean, type errors, cross-section validation."""
import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megahybrid.config import schema
from megahybrid.config.loader import ConfigError, dump_yaml, field_docs, load_config
from megahybrid.config.validate import validate_config

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "clusters" not in p.parts)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megahybrid", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_every_field_has_a_docstring():
    sections = [f.type for f in dataclasses.fields(schema.RunConfig)]
    classes = [schema.RunConfig] + [getattr(schema, t) if isinstance(t, str) else t for t in sections
                                    if (t if isinstance(t, str) else getattr(t, "__name__", "")).endswith("Config")]
    from megahybrid.algorithms.registry import algorithm_names, get_algorithm

    classes += [get_algorithm(n).Config for n in algorithm_names()]
    for cls in classes:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name, "").strip()]
        assert not missing, f"{cls.__name__}: fields without docstring: {missing}"


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", """
        model: {num_layers: 4, hidden_size: 256}
        optim: {lr: 1.0e-5}
        train: {steps: 7}
    """)
    child = write(tmp_path, "child.yaml", """
        base: base.yaml
        model: {hidden_size: 512}
        train: {prompts_per_step: 8}
    """)
    cfg = load_config(child, ["optim.lr=1e-6", "train.steps=3", "rollout.stop=[a, b]"])
    assert cfg.model.num_layers == 4 and cfg.model.hidden_size == 512   # merged, child wins
    assert cfg.optim.lr == pytest.approx(1e-6) and isinstance(cfg.optim.lr, float)  # YAML `1e-6` string -> float
    assert cfg.train.steps == 3 and cfg.train.prompts_per_step == 8
    assert cfg.rollout.stop == ["a", "b"]
    # the resolved YAML loads back to the same tree
    again = write(tmp_path, "resolved.yaml", dump_yaml(cfg))
    assert load_config(again) == cfg


def test_inheritance_cycle_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    b = write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(b)


def test_unknown_key_names_close_match(tmp_path):
    path = write(tmp_path, "bad.yaml", "optim: {lerning_rate: 1.0}\ntrain: {stpes: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "train.stpes" in text and "'train.steps'" in text
    assert "optim.lerning_rate" in text and str(path) in text


def test_wrong_type_names_dotted_path(tmp_path):
    path = write(tmp_path, "bad.yaml", "train: {steps: many}\nmodel: {tie_word_embeddings: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "train.steps: expected int, got 'many'" in text
    assert "model.tie_word_embeddings: expected bool" in text


def test_literal_choice_error_suggests(tmp_path):
    path = write(tmp_path, "bad.yaml", "algorithm: {name: grpo, loss_agg: token_man}\n")
    with pytest.raises(ConfigError, match=r"algorithm.loss_agg: expected one of .*did you mean 'token_mean'"):
        load_config(path)


def test_polymorphic_algorithm_section(tmp_path):
    from megahybrid.algorithms.registry import get_algorithm

    cfg = load_config(write(tmp_path, "a.yaml", "algorithm: {name: grpo}\n"))
    assert type(cfg.algorithm) is get_algorithm("grpo").Config
    with pytest.raises(ConfigError, match=r"algorithm.name: unknown algorithm 'srtf'.*did you mean 'srft'"):
        load_config(write(tmp_path, "b.yaml", "algorithm: {name: srtf}\n"))


@pytest.mark.parametrize("overrides, fragment", [
    (["model.num_attention_heads=6", "model.num_query_groups=6", "parallel.tensor_model_parallel_size=4"],
     "num_attention_heads (6) must be divisible by parallel.tensor_model_parallel_size (4)"),
    (["parallel.world_size=8", "parallel.tensor_model_parallel_size=2", "parallel.data_parallel_size=2"],
     "!= world size (8)"),
    (["model.max_position_embeddings=100", "rollout.max_new_tokens=90", "data.max_prompt_tokens=20"],
     "exceeds model.max_position_embeddings (100)"),
    (["model.num_layers=3", "parallel.pipeline_model_parallel_size=2"], "num_layers (3) must be divisible"),
])
def test_cross_section_validation(tmp_path, overrides, fragment):
    path = write(tmp_path, "c.yaml", "train: {steps: 1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert fragment in str(err.value)


def test_validate_accepts_consistent_layout():
    cfg = schema.RunConfig()
    cfg.parallel.world_size = 8
    cfg.parallel.tensor_model_parallel_size = 2
    assert validate_config(cfg) == []


def test_cli_exit_codes(tmp_path):
    good = write(tmp_path, "good.yaml", "train: {steps: 3}\n")
    ok = run_cli("config", "check", str(good), "optim.lr=3e-4")
    assert ok.returncode == 0, ok.stderr
    assert "lr: 0.0003" in ok.stdout
    typo = run_cli("config", "check", str(good), "train.stesp=3")
    assert typo.returncode == 2 and "train.stesp" in typo.stderr and "train.steps" in typo.stderr
    wrong = run_cli("config", "check", str(good), "rollout.n=lots")
    assert wrong.returncode == 2 and "rollout.n: expected int" in wrong.stderr
    missing = run_cli("config", "check", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_every_shipped_config_passes_check(path, capsys):
    from megahybrid.cli import main

    code = main(["config", "check", str(path)])   # in-process: the same code path, without a torch import each
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "algorithm:" in captured.out
