"""The cluster recipes (configs/*.yaml) and their sbatch scripts: they resolve, fit, cite their numbers, match the
SPEC.md section 8 recipe, and the #SBATCH lines agree with the configs' launch sections."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from megahybrid.config import plan
from megahybrid.config.loader import load_config, load_raw
from megahybrid.config.plan import plan_problems
from megahybrid.config.validate import validate_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ["srft_7b", "superrl_7b", "sasr_1p5b", "srl_7b", "srl_then_rlvr_7b"]
CONFIG_FILES = sorted(p for p in (ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs/clusters").glob("*.yaml"))
SCRIPTS = {name: ROOT / "slurm" / f"{name}.sh" for name in RECIPES}

# A number is cited when its comment names a source with a place in it, or says it is our choice.
SOURCE = re.compile(
    r"our choice"
    r"|\b(SRFT|SuperRL|SASR)\b[^#]*\b(section|App\.|Eq\.|Figure|Table|Algorithm)"
    r"|\bSRL\b[^#]*\""  # the SRL summary has named sections: SRL "Loss & Training"
    r"|SPEC\.md section \d|ENVIRONMENT\.md|config\.json|Megatron-Core")
NUMBER_LINE = re.compile(r"^\s*(?:-\s+)?[A-Za-z_][\w]*:\s*([^#\s][^#]*?)\s*(?:#(.*))?$")


def uncited_numbers(text: str) -> list[str]:
    """Lines `key: <number>` whose comment neither names a source + place nor says `our choice`."""
    bad = []
    for lineno, line in enumerate(text.splitlines(), 1):
        match = NUMBER_LINE.match(line)
        if not match:
            continue
        value, comment = match.group(1), match.group(2) or ""
        if value.startswith(("'", '"')):
            value = value.strip("'\"")
            if not re.fullmatch(r"[\d:.]+", value):  # quoted times like "24:00:00" count as numbers
                continue
        elif not isinstance(yaml.safe_load(value), (int, float)) or isinstance(yaml.safe_load(value), bool):
            continue
        if not SOURCE.search(comment):
            bad.append(f"line {lineno}: {line.strip()}")
    return bad


def stage_configs(name: str):
    """The recipe and, for a curriculum, each stage merged over it (validated like a run config)."""
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    stages = plan.stage_configs(cfg)
    for i, stage in enumerate(stages):
        assert validate_config(stage) == [], f"stage {i}"
    return [cfg, *stages]


@pytest.mark.parametrize("name", RECIPES + ["sasr_1p5b_gsm8k"])
def test_recipe_resolves_and_its_layout_fits(name):
    for cfg in stage_configs(name):
        assert plan_problems(cfg) == []


def test_curriculum_has_an_srl_then_a_grpo_math_stage():
    base, srl, rlvr = stage_configs("srl_then_rlvr_7b")
    assert (srl.algorithm.name, srl.reward.name) == ("srl", "srl_similarity")
    assert (rlvr.algorithm.name, rlvr.reward.name) == ("grpo", "math")
    assert rlvr.train.prompts_per_step == 128 and srl.train.prompts_per_step == 512  # SRL: 128 vs 512


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_number_cites_a_source_or_says_our_choice(path):
    assert uncited_numbers(path.read_text()) == []


def test_citation_check_catches_an_uncited_number():
    text = "optim:\n  lr: 1.0e-6   # fixed\n  steps: 500  # SRFT App. B\n  warmup: 3\n  name: srft\n" \
           "  time: '01:00:00'\n  n: 8 # our choice\n"
    assert uncited_numbers(text) == ["line 2: lr: 1.0e-6   # fixed", "line 4: warmup: 3",
                                     "line 6: time: '01:00:00'"]


def test_srft_7b_is_the_spec_section_8_recipe():
    cfg = load_config(ROOT / "configs/srft_7b.yaml")
    spec8 = {  # SPEC.md section 8, typed in by hand
        ("model", "family"): "qwen2", ("model", "rotary_base"): 40000.0,
        ("model", "max_position_embeddings"): 16384, ("rollout", "n"): 8, ("rollout", "max_new_tokens"): 8192,
        ("rollout", "temperature"): 1.0, ("optim", "lr"): 1e-6, ("optim", "schedule"): "constant",
        ("optim", "warmup_steps"): 0, ("train", "steps"): 500, ("train", "prompts_per_step"): 128,
        ("reward", "name"): "math", ("reward", "format_coef"): 0.0, ("data", "format"): "openr1",
        ("data", "template"): "srft", ("launch", "nodes"): 8, ("launch", "gpus_per_node"): 8,
        ("algorithm", "name"): "srft", ("algorithm", "sft_coef"): 0.5, ("algorithm", "rl_coef"): 0.1,
        ("train", "eval_temperature"): 0.6, ("train", "eval_max_new_tokens"): 8192,
    }
    got = {key: getattr(getattr(cfg, key[0]), key[1]) for key in spec8}
    assert got == spec8
    assert "Qwen2.5-Math-7B" in cfg.model.hf_path and "openr1_math_46k_8192" in cfg.data.train
    assert cfg.launch.nodes * cfg.launch.gpus_per_node == 64


def test_recipes_use_the_shared_base():
    for name in RECIPES:
        chain, path = [], ROOT / "configs" / f"{name}.yaml"
        while path is not None:
            data = yaml.safe_load(path.read_text())
            chain.append(path.name)
            path = path.parent / data["base"] if "base" in data else None
        assert chain[-1] == "base.yaml", chain
    assert load_raw(ROOT / "configs/srft_7b.yaml")["model"]["hidden_size"] == 3584  # from base_7b.yaml


def sbatch_options(script: Path) -> dict[str, str]:
    opts = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH "):
            for tok in line.split()[1:]:
                key, _, value = tok.partition("=")
                opts[key] = value
    return opts


@pytest.mark.parametrize("name", RECIPES)
def test_sbatch_header_matches_the_config(name):
    script = SCRIPTS[name]
    opts = sbatch_options(script)
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert opts["--nodes"] == str(cfg.launch.nodes)
    assert opts["--gpus-per-node"] == str(cfg.launch.gpus_per_node)
    assert opts["--ntasks-per-node"] == "1"
    assert opts["--time"] == cfg.launch.time_limit
    assert opts["--signal"] == f"B:USR1@{cfg.launch.preempt_signal_s}"
    assert "--exclusive" in opts and "--requeue" in opts and opts["--job-name"] == name
    last = script.read_text().strip().splitlines()[-1]
    assert last == f'megahybrid_sbatch_main configs/{name}.yaml "$@"'
