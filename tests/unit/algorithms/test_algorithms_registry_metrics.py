"""Every registered method: its Config (docstrings, SPEC defaults, validation, loading) and the metric keys SPEC 4
requires it to log (loss parts, entropy per token group, routing fractions, reward mean, response length, clip
fraction; the grad norm is the trainer's `actor/grad_norm`)."""
import dataclasses
import math

import pytest
import torch

from algo_harness import make_algo, make_batch, run_split
from megahybrid.algorithms import algorithm_names, get_algorithm
from megahybrid.algorithms.base import Algorithm
from megahybrid.config.loader import ConfigError, field_docs, from_dict

ROLLOUT_KEYS = {"entropy/rollout", "entropy/rollout_pos", "entropy/rollout_neg", "reward/mean",
                "response_length/mean", "actor/clip_frac"}
DEMO_KEYS = {"entropy/demo", "response_length/demo"}
# (name, overrides, step, required keys)
REQUIRED = [
    ("sft", {}, 0, {"loss/sft"} | DEMO_KEYS),
    ("sft_kl", {}, 0, {"loss/sft", "loss/kl", "actor/kl"} | DEMO_KEYS),
    ("grpo", {}, 0, {"loss/pg"} | ROLLOUT_KEYS),
    ("grpo", {"kl_coef": 0.1, "entropy_coef": 0.01}, 0, {"loss/pg", "loss/kl", "actor/kl", "loss/entropy"}
     | ROLLOUT_KEYS),
    ("srl", {}, 0, {"loss/pg"} | ROLLOUT_KEYS),
    ("srft", {}, 0, {"loss/sft_demo", "loss/rl_demo", "loss/self", "srft/w_sft", "srft/w_rl"} | ROLLOUT_KEYS
     | DEMO_KEYS),
    ("srft", {"entropy_scope": "token", "self_rollout_loss": "reinforce"}, 0,
     {"loss/sft_demo", "loss/rl_demo", "loss/self_pos", "loss/self_neg", "srft/w_sft", "srft/w_rl"}
     | (ROLLOUT_KEYS - {"actor/clip_frac"}) | DEMO_KEYS),
    ("superrl", {}, 0, {"loss/pg", "loss/sft", "loss/kl", "actor/kl", "superrl/sft_frac", "superrl/pg_frac",
                           "superrl/no_signal"} | ROLLOUT_KEYS | DEMO_KEYS),
    ("superrl", {"gate": "advantage"}, 0, {"loss/pg", "loss/sft", "superrl/sft_frac", "superrl/no_signal"}
     | ROLLOUT_KEYS | DEMO_KEYS),
    ("superrl", {"gate": "uncertainty"}, 0, {"loss/pg", "loss/sft", "superrl/sft_frac", "superrl/s_pg",
                                                "superrl/s_sft", "superrl/w_pg", "superrl/w_sft"}
     | ROLLOUT_KEYS | DEMO_KEYS),
    ("sasr", {"warmup_steps": 1}, 0, {"loss/sft", "sasr/p", "sasr/is_sft", "sasr/g_warmup",
                                            "sasr/g_last_sft"} | DEMO_KEYS),
    ("sasr", {"warmup_steps": 0, "schedule": "ssr"}, 1, {"loss/pg", "loss/kl", "actor/kl", "sasr/p",
                                                               "sasr/is_sft"} | ROLLOUT_KEYS),
]


def test_every_method_is_registered():
    assert set(algorithm_names()) >= {"sft", "sft_kl", "grpo", "srft", "superrl", "sasr", "srl"}
    for name in algorithm_names():
        cls = get_algorithm(name)
        assert issubclass(cls, Algorithm) and cls.name == name and cls.Config().name == name


@pytest.mark.parametrize("name,overrides,step,required", REQUIRED, ids=[f"{r[0]}-{i}" for i, r in
                                                                      enumerate(REQUIRED)])
def test_method_returns_its_spec_metric_keys(name, overrides, step, required):
    batch, logp, entropy = make_batch(seed=21, demos=(1, 2), rewards="binary", empty_prob=0.0)
    algo = make_algo(name, **overrides)
    plan = algo.plan(step)
    if not plan.demos:  # e.g. a SASR GRPO step: the trainer loads no demos
        keep = ~batch.is_demo
        batch, logp, entropy = batch.select(keep), logp[keep], entropy[keep]
    _, shares, final, _ = run_split(algo, batch, logp, entropy, plan, ranks=2, micro=2)
    after = algo.after_step(plan, 1.5)
    keys = set(shares) | set(final) | set(plan.metrics) | set(after)
    assert required <= keys, sorted(required - keys)
    assert all("/" in k for k in keys)
    assert all(math.isfinite(float(v)) for v in [*shares.values(), *final.values(), *after.values()])


# ---------------------------------------------------------------------------------------------- configs
SPEC_DEFAULTS = {
    "sft_kl": {"kl_coef": 0.2, "kl_estimator": "k3"},
    "grpo": {"filter_groups": False, "min_std": 0.0, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2,
             "clip_ratio_c": None, "tis_cap": None, "adv_eps": 1e-6, "loss_agg": "token_mean"},
    "srft": {"self_rollout_loss": "grpo", "entropy_scope": "batch", "sft_coef": 0.5, "rl_coef": 0.1,
             "entropy_weights": True, "sft_coef_fixed": None, "rl_coef_fixed": None, "demo_reward": "verify"},
    "superrl": {"gate": "reward", "kl_coef": 0.001},
    "sasr": {"schedule": "adaptive", "gamma": 1.0},
    "srl": {"kl_coef": 0.0, "filter_groups": True, "min_std": 1e-4, "first_step": False, "require_think": True},
}


@pytest.mark.parametrize("name", sorted(SPEC_DEFAULTS) + ["sft"])
def test_config_fields_documented_with_spec_defaults(name):
    cfg_cls = get_algorithm(name).Config
    docs = field_docs(cfg_cls)
    missing = [f.name for f in dataclasses.fields(cfg_cls) if not docs.get(f.name, "").strip()]
    assert not missing
    cfg = cfg_cls()
    for key, value in SPEC_DEFAULTS.get(name, {}).items():
        assert getattr(cfg, key) == value, key
    assert cfg.validate() == []


@pytest.mark.parametrize("name,overrides,key", [
    ("grpo", {"min_std": -1.0}, "min_std"), ("grpo", {"clip_ratio_c": 0.5}, "clip_ratio_c"),
    ("srft", {"sft_coef": -0.1}, "sft_coef"), ("sft", {"kl_coef": 0.1}, "kl_coef"),
    ("sasr", {"warmup_steps": 0}, "warmup_steps"), ("sasr", {"lower": 0.8, "upper": 0.2}, "lower/upper"),
    ("sasr", {"kl_coef": 0.1}, "kl_coef"), ("srl", {"step_pattern": "(unclosed"}, "step_pattern"),
    ("superrl", {"tis_cap": 0.0}, "tis_cap")])
def test_validate_names_the_bad_key(name, overrides, key):
    problems = get_algorithm(name).Config(**overrides).validate()
    assert problems and problems[0].startswith(f"{key}:")


def test_configs_load_from_yaml_dicts_with_clear_errors():
    cfg = from_dict({"algorithm": {"name": "srft", "entropy_scope": "token", "rl_coef_fixed": 1}})
    assert cfg.algorithm.entropy_scope == "token" and cfg.algorithm.rl_coef_fixed == 1.0
    with pytest.raises(ConfigError, match="did you mean 'algorithm.warmup_steps'"):
        from_dict({"algorithm": {"name": "sasr", "warmup_step": 3}})
    with pytest.raises(ConfigError, match="'uncertainty'"):
        from_dict({"algorithm": {"name": "superrl", "gate": "uncertain"}})


def test_needs_declarations():
    assert not make_algo("sft").needs_rollouts and make_algo("sft").needs_demos
    assert not make_algo("sft").needs_ref and make_algo("sft_kl").needs_ref
    assert make_algo("superrl").needs_ref and not make_algo("superrl", kl_coef=0.0).needs_ref
    assert make_algo("srft").needs_demos and not make_algo("srft").needs_ref
    assert not make_algo("grpo").needs_demos and not make_algo("srl").needs_ref
    plan = make_algo("srft").plan(3)
    assert plan.rollouts and plan.demos and plan.kind == "hybrid"
    assert torch.equal(make_algo("grpo").keep_sequences(make_batch(0)[0]),
                       torch.ones(make_batch(0)[0].num_sequences, dtype=torch.bool))
