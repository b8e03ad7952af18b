"""Rollout pieces that need no engine: per-prompt seeds, sampling options from config, the weight-sync folder."""
import os

import torch
from safetensors.torch import load_file

from megahybrid.config.schema import RolloutConfig
from megahybrid.rollout import SamplingOptions, derive_seed, save_hf_weights


def test_request_seeds_are_per_prompt_and_spread():
    sp = SamplingOptions(seed=7)
    seeds = sp.request_seeds(5)
    assert seeds[2:] == sp.request_seeds(3, offset=2)  # a shard's seeds do not depend on how prompts are split
    assert len(set(seeds)) == 5 and all(0 <= s < 2**48 for s in seeds)
    # consecutive base seeds (steps) do not reuse each other's streams, nor do the n samples (seed + j) collide
    nxt = SamplingOptions(seed=8).request_seeds(5)
    spans = {s + j for s in seeds + nxt for j in range(64)}
    assert len(spans) == 10 * 64
    assert SamplingOptions().request_seeds(2) == [None, None] and derive_seed(7, 0) == seeds[0]


def test_sampling_from_config():
    cfg = RolloutConfig(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=33, stop=["</answer>"])
    sp = SamplingOptions.from_config(cfg, seed=3, max_new_tokens=10)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.max_new_tokens, sp.stop, sp.seed) == \
        (0.7, 0.9, 5, 10, ["</answer>"], 3)
    sp.stop.append("x")
    assert cfg.stop == ["</answer>"]  # no aliasing into the config


def test_save_hf_weights_atomic_and_dedups_tied(tmp_path):
    emb = torch.randn(10, 4)
    state = {"model.embed_tokens.weight": emb, "lm_head.weight": emb, "model.norm.weight": torch.ones(4)}
    (tmp_path / "old-00001.safetensors").write_bytes(b"stale")
    out = save_hf_weights(state, tmp_path)
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    back = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(back) == ["model.embed_tokens.weight", "model.norm.weight"]
    assert torch.equal(back["model.embed_tokens.weight"], emb)
    save_hf_weights({"model.norm.weight": torch.zeros(4)}, tmp_path)  # overwrite in place
    assert torch.equal(load_file(os.path.join(out, "model.safetensors"))["model.norm.weight"], torch.zeros(4))
