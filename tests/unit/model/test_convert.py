"""HF <-> Megatron weight layouts, checked against explicit loops that re-state Megatron's layout rules:
grouped QKV (per KV group: its query heads, then k, then v; TP splits whole groups), fused gate/up fc1 per rank,
row-parallel column splits, vocabulary rows padded with zeros; plus the random init, safetensors I/O and the
config mapping."""
import dataclasses
import json

import pytest
import torch

from megahybrid.config.schema import ModelConfig, RunConfig
from megahybrid.model import convert, spec
from megahybrid.model.hf_config import hf_config_dict, model_config_from_hf
from megahybrid.model.hf_io import INDEX_FILE, HFCheckpointReader, HFCheckpointWriter


class DictSource:
    def __init__(self, tensors):
        self.tensors = tensors

    def has(self, name):
        return name in self.tensors

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def read(self, name, rows=None, cols=None):
        t = self.tensors[name]
        t = t if rows is None else t[rows]
        return t if cols is None else t[:, cols]


M = ModelConfig(family="qwen2", num_layers=1, hidden_size=8, ffn_hidden_size=12, num_attention_heads=8,
                num_query_groups=4, head_dim=2, vocab_size=13, tie_word_embeddings=False)


def _source(m=M, seed=0):
    return DictSource({n: torch.randn(s, generator=torch.Generator().manual_seed(seed + i))
                       for i, (n, s) in enumerate(convert.hf_tensor_shapes(m).items())})


@pytest.mark.parametrize("tp_size", [1, 2, 4])
@pytest.mark.parametrize("kind", ["weight", "bias"])
def test_qkv_layout_matches_megatron_grouping(tp_size, kind):
    src, d = _source(), M.head_dim
    heads_per_group, groups = M.num_attention_heads // M.num_query_groups, M.num_query_groups
    p = "model.layers.0.self_attn."
    q, k, v = (src.tensors[p + f"{x}_proj.{kind}"] for x in "qkv")
    mapping = convert._layer_map(f"self_attention.linear_qkv.{kind}", 0)
    for rank in range(tp_size):
        expected = []
        for g in range(rank * groups // tp_size, (rank + 1) * groups // tp_size):
            for h in range(heads_per_group):
                head = g * heads_per_group + h
                expected.append(q[head * d:(head + 1) * d])
            expected += [k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
        got = mapping.to_local(src, M, convert.TPInfo(rank, tp_size))
        assert torch.equal(got, torch.cat(expected)), f"rank {rank}/{tp_size}"


@pytest.mark.parametrize("tp_size", [1, 2, 3])
def test_fc1_is_gate_then_up_of_this_ranks_rows(tp_size):
    src, f = _source(), M.ffn_hidden_size
    gate, up = src.tensors["model.layers.0.mlp.gate_proj.weight"], src.tensors["model.layers.0.mlp.up_proj.weight"]
    mapping = convert._layer_map("mlp.linear_fc1.weight", 0)
    for rank in range(tp_size):
        rows = slice(rank * f // tp_size, (rank + 1) * f // tp_size)
        got = mapping.to_local(src, M, convert.TPInfo(rank, tp_size))
        assert torch.equal(got, torch.cat([gate[rows], up[rows]]))


@pytest.mark.parametrize("suffix,hf", [("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
                                       ("mlp.linear_fc2.weight", "mlp.down_proj.weight")])
def test_row_parallel_layers_split_input_columns(suffix, hf):
    src = _source()
    full = src.tensors["model.layers.0." + hf]
    mapping = convert._layer_map(suffix, 0)
    parts = [mapping.to_local(src, M, convert.TPInfo(r, 2)) for r in range(2)]
    assert torch.equal(torch.cat(parts, dim=1), full)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_vocab_rows_are_padded_with_zero_rows(tp_size):
    src = _source()
    padded = spec.padded_vocab_size(M.vocab_size, tp_size)
    assert padded % tp_size == 0 and M.vocab_size <= padded < M.vocab_size + tp_size
    mapping = convert._Vocab("lm_head.weight", padded)
    parts = [mapping.to_local(src, M, convert.TPInfo(r, tp_size)) for r in range(tp_size)]
    full = torch.cat(parts)
    assert full.shape == (padded, M.hidden_size)
    assert torch.equal(full[:M.vocab_size], src.tensors["lm_head.weight"])
    assert torch.count_nonzero(full[M.vocab_size:]) == 0


def test_every_map_inverts_at_tp1():
    src = _source()
    tp = convert.TPInfo(0, 1)
    suffixes = ["input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                "self_attention.linear_proj.weight", "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight",
                "mlp.linear_fc2.weight", "self_attention.linear_qkv.layer_norm_weight",
                "mlp.linear_fc1.layer_norm_weight"]
    for suffix in suffixes:
        mapping = convert._layer_map(suffix, 0)
        for name, tensor in mapping.to_hf(mapping.to_local(src, M, tp), M, tp):
            assert torch.equal(tensor, src.tensors[name]), suffix
    with pytest.raises(KeyError, match="no HF mapping"):
        convert._layer_map("mlp.router.weight", 0)


def test_random_source_is_seeded_per_tensor_and_slice_consistent():
    a, b = convert.RandomSource(M, seed=7), convert.RandomSource(M, seed=7)
    name = "model.layers.0.mlp.gate_proj.weight"
    assert torch.equal(a.read(name), b.read(name))
    assert torch.equal(a.read(name, rows=slice(3, 9)), a.read(name)[3:9])  # any TP slice of the same tensor
    assert not torch.equal(a.read(name), convert.RandomSource(M, seed=8).read(name))
    assert torch.equal(a.read("model.norm.weight"), torch.ones(M.hidden_size))
    assert torch.count_nonzero(a.read("model.layers.0.self_attn.q_proj.bias")) == 0
    big = dataclasses.replace(M, hidden_size=256, ffn_hidden_size=512)
    w = convert.RandomSource(big, 0).read(name)
    assert abs(float(w.std()) - big.init_method_std) < 0.1 * big.init_method_std
    down = convert.RandomSource(big, 0).read("model.layers.0.mlp.down_proj.weight")
    assert abs(float(down.std()) - big.init_method_std / 2 ** 0.5) < 0.1 * big.init_method_std


def test_check_source_names_the_missing_tensor():
    src = _source()
    del src.tensors["model.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(KeyError, match="k_proj.bias"):
        convert.check_source(src, M, "ckpt")
    src = _source()
    src.tensors["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"model.norm.weight.*\(3,\).*\(8,\)"):
        convert.check_source(src, M, "ckpt")


def test_writer_shards_and_reader_reads_slices(tmp_path):
    tensors = {f"t{i}": torch.randn(4, 6) for i in range(5)}
    writer = HFCheckpointWriter(str(tmp_path), max_shard_bytes=200)
    writer.add_all(tensors.items())
    writer.close()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) >= 2
    with HFCheckpointReader(str(tmp_path)) as reader:
        assert reader.names() == sorted(tensors)
        assert reader.shape("t3") == (4, 6)
        assert torch.equal(reader.read("t3", rows=slice(1, 3)), tensors["t3"][1:3])
        assert torch.equal(reader.read("t2", cols=slice(2, 5)), tensors["t2"][:, 2:5])
        assert torch.equal(reader.read("t0"), tensors["t0"])
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        HFCheckpointReader(str(tmp_path / "nothing"))


@pytest.mark.parametrize("family,tie", [("llama", True), ("qwen2", False)])
def test_hf_config_round_trip(tmp_path, family, tie):
    m = dataclasses.replace(M, family=family, tie_word_embeddings=tie, add_qkv_bias=None, rotary_base=40000.0,
                            head_dim=1 if family == "qwen2" else M.head_dim)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(m)))
    got = model_config_from_hf(str(tmp_path), ModelConfig())
    for field in ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_query_groups", "head_dim", "vocab_size", "rotary_base", "tie_word_embeddings", "qkv_bias"):
        assert getattr(got, field) == getattr(m, field), field
    assert got.hf_path == str(tmp_path)


def test_model_config_from_hf_rejects_what_it_cannot_convert(tmp_path):
    base = hf_config_dict(dataclasses.replace(M, family="llama", add_qkv_bias=None))
    for patch, message in (({"architectures": ["MistralForCausalLM"]}, "MistralForCausalLM"),
                           ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "llama3"),
                           ({"attention_bias": True}, "attention_bias")):
        (tmp_path / "config.json").write_text(json.dumps({**base, **patch}))
        with pytest.raises(ValueError, match=message):
            model_config_from_hf(str(tmp_path), ModelConfig())
    with pytest.raises(FileNotFoundError, match="config.json"):
        model_config_from_hf(str(tmp_path / "missing"), ModelConfig())


def test_gpu_paths_fail_clearly_without_cuda_or_te():
    from megahybrid.parallel.init import _backend

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = RunConfig()
    cfg.parallel.backend = "nccl"
    with pytest.raises(RuntimeError, match="nccl.*CUDA"):
        _backend(cfg)
    cfg.parallel.backend = "auto"
    assert _backend(cfg) == "gloo"
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="transformer-engine"):
            spec.layer_spec(use_gpu=True)
    with pytest.raises(ValueError, match="params_dtype"):
        spec.transformer_config(dataclasses.replace(M, params_dtype="bfloat16"), cfg.parallel, use_gpu=False)


def test_yaml_rope_theta_and_context_override_the_checkpoint(tmp_path):
    """SRFT's recipe raises Qwen2.5-Math-7B's RoPE theta 10,000 -> 40,000 and its context 4,096 -> 16,384."""
    m = dataclasses.replace(M, family="qwen2", add_qkv_bias=None, rotary_base=10000.0, head_dim=1,
                            max_position_embeddings=4096)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(m)))
    got = model_config_from_hf(str(tmp_path), ModelConfig(rotary_base=40000.0, max_position_embeddings=16384))
    assert got.rotary_base == 40000.0 and got.max_position_embeddings == 16384
    assert model_config_from_hf(str(tmp_path), ModelConfig()).rope_theta == 10000.0  # unset: the checkpoint's
    exported = hf_config_dict(got)
    assert exported["max_position_embeddings"] == 16384
    assert (exported.get("rope_parameters") or {}).get("rope_theta", exported.get("rope_theta")) == 40000.0
