"""Shared fixtures of the Megatron policy tests: tiny HF models, micro-batches, a loss with every kind of term,
the torchrun launcher, and the float64 Hugging Face reference (an independent implementation of the model)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "megatron_worker.py"
VOCAB = 61
"""Odd on purpose: at TP=2 the vocabulary is padded to 62 (one zero row that must be masked out)."""


def tiny_hf_model(path: Path, family: str, tie: bool) -> str:
    """A 4-layer GQA model (4 query heads, 2 KV heads) saved as an HF folder. Norm weights and (Qwen2) QKV
    biases are perturbed away from their 1 / 0 init so a mapping mistake shows up in the logits."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                  tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    cfg = LlamaConfig(**common, head_dim=16) if family == "llama" else Qwen2Config(**common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or "bias" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return str(path)


def eval_tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))


def micro_batches(num: int = 4, num_seq: int = 3, num_pos: int = 9) -> list[SimpleNamespace]:
    """Four micro-batches of different lengths, response masks with holes (the loss is normalised by the
    global count of masked tokens). Every other one also carries the mask as `response_mask` (the Batch
    contract), so the head runs only on those positions there and on all positions in the others."""
    gen = torch.Generator().manual_seed(5)
    out = []
    for i in range(num):
        t = num_pos - (i % 2)
        mask = torch.zeros(num_seq, t)
        mask[:, 3:] = 1
        mask[0, -2:] = 0
        mb = SimpleNamespace(tokens=torch.randint(0, VOCAB, (num_seq, t), generator=gen), mask=mask)
        if i % 2 == 0:
            mb.response_mask = mask.bool()
        out.append(mb)
    return out


def make_loss_fn(sigma: torch.Tensor, num_tokens: float):
    """A loss share using log-probs, entropies and a learnable scalar (like SuperRL's log-sigma)."""
    def loss_fn(mb, logp, entropy):
        mask = mb.mask.to(logp)
        nll = -(logp * mask).sum() / num_tokens
        ent = (entropy * mask).sum() / num_tokens
        loss = torch.exp(-sigma[0]) * nll - 0.1 * ent + sigma[0] / 4
        return loss, {"test/nll": nll, "test/entropy": ent}
    return loss_fn


def chat_prompt_rows(tok, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt as one user turn through the tokenizer's chat template (generation prompt on)."""
    rows = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                    return_dict=False) for p in prompts]
    return [list(r["input_ids"]) if isinstance(r, dict) else list(r) for r in rows]


def hf_logp_entropy(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[S, T] aligned log-probs / entropies (position 0 = 0) from a transformers model's logits."""
    logits = model(tokens).logits
    logs = torch.log_softmax(logits.to(torch.float64), -1)
    zeros = torch.zeros(tokens.shape[0], 1, dtype=logs.dtype)
    logp = torch.cat([zeros, logs[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]], 1)
    entropy = torch.cat([zeros, -(logs.exp() * logs).sum(-1)[:, :-1]], 1)
    return logp, entropy


def hf_reference_step(hf_dir: str, mbs, sigma0: float = 0.3) -> dict:
    """Loss, metrics, gradients (HF names + `sigma`) and global grad norm of the summed loss shares, computed
    with transformers in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
    sigma = torch.nn.Parameter(torch.tensor([sigma0], dtype=torch.float64))
    num_tokens = sum(float(mb.mask.sum()) for mb in mbs)
    loss_fn = make_loss_fn(sigma, num_tokens)
    total, metrics = 0.0, {}
    for mb in mbs:
        logp, entropy = hf_logp_entropy(model, mb.tokens)
        loss, m = loss_fn(mb, logp, entropy)
        total = total + loss
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + float(v.detach())
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    grads["sigma"] = sigma.grad.detach().clone()
    norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads.values())))
    return {"loss": float(total), "metrics": metrics, "grads": grads, "grad_norm": norm}


def launch(scenario: str, nproc: int, out: Path, *args: str, timeout: int = 300) -> dict:
    """Run the worker under torchrun (or as a plain single process when nproc == 1); return its results."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if nproc == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKER)]
    proc = subprocess.run([*cmd, scenario, str(out), *args], env=env, cwd=str(REPO), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"worker {scenario} (nproc={nproc}) failed with {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return torch.load(out, weights_only=False)
