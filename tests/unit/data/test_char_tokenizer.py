"""The tiny-model helpers: character tokenizer round trips, and the saved model folders load in transformers."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megahybrid.config.schema import ModelConfig
from megahybrid.model.tiny import ARITH_ALPHABET, build_char_tokenizer, build_tiny_hf_model, char_vocab


def test_char_tokenizer_roundtrip(tmp_path):
    build_char_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "Q: (3*4)/2 = ?\n<think>12/2=6</think>\\boxed{6}"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    # every character is a token except the three markup strings, which are one token each
    assert len(ids) == len(text) - (len("<think>") - 1) - (len("</think>") - 1) - (len("\\boxed{") - 1)
    assert tok.convert_ids_to_tokens(tok.encode("<think>", add_special_tokens=False)) == ["<think>"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.encode("é", add_special_tokens=False) == [tok.unk_token_id]
    assert len(tok) == len(char_vocab())


def test_small_alphabet(tmp_path):
    tok = build_char_tokenizer(tmp_path, ARITH_ALPHABET)
    assert len(tok) == 7 + len(set(ARITH_ALPHABET))
    assert tok.decode(tok.encode("12+3=15", add_special_tokens=False)) == "12+3=15"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_model_folder_loads(tmp_path, family):
    cfg = ModelConfig(family=family, vocab_size=128, num_layers=1, hidden_size=64, ffn_hidden_size=96,
                      num_attention_heads=2, num_query_groups=1, head_dim=32, rotary_base=40000.0)
    path = build_tiny_hf_model(cfg, tmp_path / family, seed=3)
    state = torch.random.get_rng_state()
    again = build_tiny_hf_model(cfg, tmp_path / "again", seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # caller's RNG untouched
    m1, m2 = AutoModelForCausalLM.from_pretrained(path), AutoModelForCausalLM.from_pretrained(again)
    assert type(m1).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    c = m1.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (128, 64, 96, 1)
    assert (c.num_attention_heads, c.num_key_value_heads) == (2, 1)
    assert m1.model.layers[0].self_attn.head_dim == 32
    assert c.rope_parameters["rope_theta"] == 40000.0 and c.tie_word_embeddings
    assert m1.model.layers[0].self_attn.q_proj.bias is not None if family == "qwen2" else \
        m1.model.layers[0].self_attn.q_proj.bias is None
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n  # same seed, same weights
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok.encode("1+2=", add_special_tokens=False)])
    assert m1(ids).logits.shape == (1, 4, 128)


def test_tiny_model_config_errors(tmp_path):
    with pytest.raises(ValueError, match="model.vocab_size"):
        build_tiny_hf_model(ModelConfig(vocab_size=16), tmp_path / "a")
    with pytest.raises(ValueError, match="model.add_qkv_bias"):
        build_tiny_hf_model(ModelConfig(vocab_size=128, add_qkv_bias=True), tmp_path / "b")
