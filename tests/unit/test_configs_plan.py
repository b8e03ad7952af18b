"""megahybrid/config/plan.py: parameter counts against Hugging Face models, the per-GPU memory formula restated
by hand, GPU placement, and the layout checks that must reject infeasible 64-GPU plans."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megahybrid.config import plan
from megahybrid.config.loader import ConfigError, load_config
from megahybrid.config.schema import RunConfig

ROOT = Path(__file__).resolve().parents[2]
SRFT = ROOT / "configs/srft_7b.yaml"
GIB = 1 << 30


def srft(*overrides: str) -> RunConfig:
    return load_config(SRFT, list(overrides), validate=False)


@pytest.mark.parametrize("family,tied", [("qwen2", False), ("qwen2", True), ("llama", True)])
def test_parameter_count_matches_a_hugging_face_model(family, tied):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    dims = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=tied)
    hf = Qwen2ForCausalLM(Qwen2Config(**dims)) if family == "qwen2" else \
        LlamaForCausalLM(LlamaConfig(**dims, head_dim=16))
    expected = sum(p.numel() for p in hf.parameters())  # shared (tied) tensors are listed once
    cfg = RunConfig()
    cfg.model = dataclasses.replace(cfg.model, family=family, vocab_size=96, hidden_size=64, ffn_hidden_size=80,
                                    num_layers=3, num_attention_heads=4, num_query_groups=2, head_dim=16,
                                    tie_word_embeddings=tied)
    assert plan.model_parameters(cfg) == expected


def test_qwen25_7b_has_the_published_size():
    assert plan.model_parameters(srft()) == 7_615_616_512  # Qwen2.5-7B model card: 7.61B parameters


def naive_parameters_per_gpu(cfg: RunConfig) -> int:
    """Largest pipeline stage over TP, by walking the stages one by one."""
    m, tp, pp = cfg.model, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    layer = plan.layer_parameters(cfg)
    per_stage = []
    for stage in range(pp):
        total = (m.num_layers // pp) * layer
        if stage == 0:
            total += m.vocab_size * m.hidden_size
        if stage == pp - 1:
            total += m.hidden_size  # final norm
            if not m.tie_word_embeddings or pp > 1:
                total += m.vocab_size * m.hidden_size
        per_stage.append(total)
    return max(-(-t // tp) for t in per_stage)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (2, 2), (1, 4)])
def test_parameters_per_gpu(tp, pp):
    cfg = srft(f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}")
    assert plan.parameters_per_gpu(cfg) == naive_parameters_per_gpu(cfg)


def test_bytes_per_parameter_are_megatrons():
    """Megatron-LM's distributed-optimizer table: bf16 params + fp32 grads = 18 B/param, or 6 + 12/d sharded."""
    for dist_opt, d in ((False, 16), (True, 16), (True, 8)):
        cfg = srft(f"parallel.use_distributed_optimizer={str(dist_opt).lower()}",
                   f"parallel.world_size={2 * d}")
        mem = plan.trainer_memory(cfg, plan.layout_of(cfg))
        per_param = (mem["weights"] + mem["grads"] + mem["optimizer"]) / plan.parameters_per_gpu(cfg)
        assert per_param == pytest.approx(6 + 12 / d if dist_opt else 18)


@pytest.mark.parametrize("recompute,sp", [(True, True), (False, True), (True, False)])
def test_activation_estimate_restated(recompute, sp):
    cfg = srft(f"model.recompute_activations={str(recompute).lower()}",
               f"parallel.sequence_parallel={str(sp).lower()}")
    s = 1024 + 8192  # max_prompt_tokens + max(max_new_tokens, max_demo_tokens)
    h, f, g, d, L, t = 3584, 18944, 4, 128, 28, 2
    one_layer = 2 * s * (h + h + (h + 2 * g * d) + h + h + h + 2 * f + f) / t  # bf16 tensors kept by one layer
    expected = L * 2 * s * h / (t if sp else 1) + one_layer if recompute else L * one_layer
    got = plan.trainer_memory(cfg, plan.layout_of(cfg))["activations"]
    assert got == pytest.approx(expected)


def test_srft_7b_estimate_fits_80_gib_with_the_formula_restated():
    cfg = srft()
    p = plan.parameters_per_gpu(cfg)
    assert p == pytest.approx(7_615_616_512 / 2, rel=1e-3)  # TP 2, PP 1
    expected = p * 2 + p * 4 + p * 12 / 16 + 0 + plan.trainer_memory(cfg, plan.layout_of(cfg))["activations"] \
        + 4 * GIB  # weights, fp32 grads, Adam over DP 16, no reference (kl_coef 0), activations, reserve
    assert sum(plan.trainer_memory(cfg, plan.layout_of(cfg)).values()) == pytest.approx(expected)
    assert expected < 80 * GIB
    ref = plan.trainer_memory(srft("algorithm.kl_coef=0.01"), plan.layout_of(cfg))["reference"]
    assert ref == p * 2  # a KL term adds a bf16 reference copy


def test_srft_7b_placement_uses_every_gpu_once():
    lay = plan.layout_of(srft())
    assert (lay.trainer_world, lay.tp, lay.pp, lay.dp, lay.trainer_per_node) == (32, 2, 1, 16, 4)
    trainer_total, engine_total = 0, 0
    for node in range(8):
        trainer, engines = lay.node_gpus(node)
        assert trainer == [0, 1, 2, 3] and engines == [[4], [5], [6], [7]]
        trainer_total += len(trainer)
        engine_total += len(engines)
    assert (trainer_total, engine_total) == (32, 32)


def test_whole_rollout_nodes_hold_only_engines():
    cfg = srft("rollout.nodes=2", "parallel.world_size=48", "rollout.num_workers=8", "rollout.gpus_per_worker=2",
               "train.prompts_per_step=96")
    lay = plan.layout_of(cfg)
    assert plan.plan_problems(cfg) == []
    assert lay.node_gpus(0) == (list(range(8)), [])
    assert lay.node_gpus(6) == ([], [[0, 1], [2, 3], [4, 5], [6, 7]])


@pytest.mark.parametrize("overrides,needle", [
    (["parallel.world_size=24", "train.prompts_per_step=96"], "must not span nodes"),
    (["parallel.world_size=30", "parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false"],
     "split evenly over the 8 trainer nodes"),
    (["rollout.num_workers=40"], "node needs 9 GPUs"),
    (["rollout.num_workers=12"], "whole engines over 8 node(s)"),
    (["rollout.gpus_per_worker=3", "rollout.num_workers=8"], "must divide model.num_attention_heads (28)"),
    (["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false",
      "parallel.use_distributed_optimizer=false"], "exceeds 80 GiB"),
    (["rollout.gpu_memory_utilization=0.25"], "KV cache holds 0 tokens"),
    (["parallel.data_parallel_size=8"], "!= TP*PP*DP"),
])
def test_infeasible_layouts_are_rejected(overrides, needle):
    cfg = srft(*overrides)
    problems = plan.plan_problems(cfg)
    assert any(needle in p for p in problems), problems
    with pytest.raises(ConfigError) as err:
        plan.describe_plan(cfg)
    assert any(needle in p and p.startswith("plan: ") for p in err.value.problems)


def test_describe_plan_states_the_layout():
    text = plan.describe_plan(srft())
    for needle in ("8 nodes x 8 GPUs = 64 GPUs", "trainer: 32 GPUs = TP 2 x PP 1 x DP 16",
                   "rollout: 32 vLLM engines x 1 GPU(s) = 32 GPUs", "idle: 0 GPUs",
                   "node 0: trainer ranks 0-3 on GPUs 0-3; engines on GPUs 4, 5, 6, 7", "of 80 GiB (fits)"):
        assert needle in text, text


def test_stage_that_switches_algorithm_replaces_the_algorithm_section():
    cfg = load_config(ROOT / "configs/srl_then_rlvr_7b.yaml")
    first, second = plan.stage_configs(cfg)
    assert first.algorithm.name == "srl" and first.algorithm.min_std == cfg.algorithm.min_std
    assert second.algorithm.name == "grpo" and not hasattr(second.algorithm, "step_pattern")
    assert second.rollout.max_new_tokens == 8192 and second.model == cfg.model
    assert "stage 1 (grpo, 200 steps)" in plan.describe_plan(cfg)


def test_cli_plan_exit_codes():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ok = subprocess.run([sys.executable, "-m", "megahybrid", "plan", str(SRFT)], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=120)
    assert ok.returncode == 0 and "TP 2 x PP 1 x DP 16" in ok.stdout, ok.stderr
    too_big = ["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false",
               "parallel.use_distributed_optimizer=false"]  # fits the layout, not the memory
    bad = subprocess.run([sys.executable, "-m", "megahybrid", "plan", str(SRFT), *too_big],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert bad.returncode == 2 and "trainer memory estimate 134.8 GiB per GPU exceeds 80 GiB" in bad.stderr, bad.stderr


def test_rollout_engine_kv_cache_restated():
    eng = plan.rollout_memory(srft(), 80 * GIB)
    budget = 0.85 * 80 * GIB  # gpu_memory_utilization of an 80 GiB GPU
    weights = 2 * 7_615_616_512  # bf16, one GPU per engine
    per_token = 2 * 28 * 4 * 128 * 2  # K and V, 28 layers, 4 KV heads of 128, bf16
    assert eng["kv_per_token"] == per_token == 57_344
    assert eng["kv_tokens"] == pytest.approx((budget - weights - 6 * GIB) / per_token)
    assert eng["kv_tokens"] > 50 * (1024 + 8192)  # dozens of full-length sequences per engine
