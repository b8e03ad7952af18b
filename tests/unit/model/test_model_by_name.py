"""`model.hf_path` (a folder or `builtin:NAME`) decides the architecture at config load: a config states only what
it changes, a stated field that disagrees with the checkpoint is a config error naming both values (exit 2), and
rotary_base / max_position_embeddings stay deliberate overrides."""
import dataclasses
import json

import pytest

from megahybrid.config.loader import ConfigError, load_config
from megahybrid.config.schema import ModelConfig
from megahybrid.model.hf_config import hf_config_dict

# a small Llama checkpoint config, deliberately unlike ModelConfig's defaults in every architecture field
CKPT = ModelConfig(family="llama", num_layers=6, hidden_size=96, ffn_hidden_size=160, num_attention_heads=3,
                   num_query_groups=1, head_dim=32, vocab_size=77, max_position_embeddings=300, rotary_base=5e5,
                   norm_epsilon=1e-5, tie_word_embeddings=False)


@pytest.fixture
def ckpt(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config_dict(CKPT)))
    return folder


def write_yaml(tmp_path, model: dict, extra: str = "") -> str:
    lines = ["model:"] + [f"  {k}: {json.dumps(v)}" for k, v in model.items()]
    path = tmp_path / "run.yaml"
    path.write_text("\n".join(lines) + "\ndata: {max_prompt_tokens: 16, max_demo_tokens: 16}\n"
                    "rollout: {max_new_tokens: 16}\n" + extra)
    return str(path)


def test_shape_comes_from_the_checkpoint(tmp_path, ckpt):
    m = load_config(write_yaml(tmp_path, {"hf_path": str(ckpt)})).model
    for field in ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_query_groups", "head_dim", "vocab_size", "norm_epsilon", "tie_word_embeddings",
                  "max_position_embeddings", "rotary_base"):
        assert getattr(m, field) == getattr(CKPT, field), field
    assert m.hf_path == str(ckpt)


def test_validation_sees_the_checkpoint_shape(tmp_path, ckpt):
    # 3 heads / 1 KV group: TP=3 is wrong for the checkpoint (1 KV group) although the defaults (4/2) say otherwise
    path = write_yaml(tmp_path, {"hf_path": str(ckpt)}, "parallel: {tensor_model_parallel_size: 2}\n")
    with pytest.raises(ConfigError, match=r"num_attention_heads \(3\)"):
        load_config(path)


def test_overrides_of_theta_and_context_are_kept(tmp_path, ckpt):
    m = load_config(write_yaml(tmp_path, {"hf_path": str(ckpt), "rotary_base": 40000.0,
                                          "max_position_embeddings": 128})).model
    assert (m.rotary_base, m.max_position_embeddings, m.num_layers) == (40000.0, 128, 6)


def test_a_stated_field_equal_to_the_checkpoint_is_fine(tmp_path, ckpt):
    m = load_config(write_yaml(tmp_path, {"hf_path": str(ckpt), "num_layers": 6, "family": "llama",
                                          "tie_word_embeddings": False})).model
    assert m.num_layers == 6


@pytest.mark.parametrize("field,value,hf_key,actual", [
    ("num_layers", 2, "num_hidden_layers", 6), ("vocab_size", 64, "vocab_size", 77),
    ("tie_word_embeddings", True, "tie_word_embeddings", False), ("family", "qwen2", "architectures", "llama"),
    ("num_query_groups", 3, "num_key_value_heads", 1)])
def test_a_disagreeing_field_is_an_error_naming_both_values(tmp_path, ckpt, capsys, field, value, hf_key, actual):
    from megahybrid.cli import main

    path = write_yaml(tmp_path, {"hf_path": str(ckpt), field: value})
    assert main(["config", "check", path]) == 2
    err = capsys.readouterr().err
    assert f"model.{field}: the config says {value!r}" in err and hf_key in err and repr(actual) in err, err
    assert str(ckpt / "config.json") in err and "run.yaml" in err


def test_dotted_override_is_checked_too(tmp_path, ckpt):
    with pytest.raises(ConfigError, match="model.hidden_size: the config says 128"):
        load_config(write_yaml(tmp_path, {"hf_path": str(ckpt)}), ["model.hidden_size=128"])


def test_unknown_builtin_and_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match="unknown builtin model 'nope'; available: builtin:smollm2-135m-instruct"):
        load_config(write_yaml(tmp_path, {"hf_path": "builtin:nope"}))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read the model config"):
        load_config(write_yaml(tmp_path, {"hf_path": str(bad)}))


def test_a_checkpoint_not_on_this_machine_keeps_the_stated_shape(tmp_path):
    # cluster recipes name a path that exists only there: their stated numbers drive `megahybrid plan`
    m = load_config(write_yaml(tmp_path, {"hf_path": str(tmp_path / "elsewhere"), "num_layers": 4})).model
    assert m.num_layers == 4 and m.hf_path == str(tmp_path / "elsewhere")


def test_builtin_smollm2_resolves_to_the_converted_folder(tmp_path):
    from megahybrid.model.smollm2 import smollm2_hf_dir

    m = load_config(write_yaml(tmp_path, {"hf_path": "builtin:smollm2-135m-instruct"},
                               "parallel: {tensor_model_parallel_size: 3}\n")).model
    assert m.hf_path == smollm2_hf_dir()
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.vocab_size) == \
        (30, 576, 9, 3, 49152)
    assert m.tie_word_embeddings and m.rotary_base == 100000.0
    assert dataclasses.replace(m).tokenizer is None  # the tokenizer defaults to hf_path downstream
