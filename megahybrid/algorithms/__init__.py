"""Pure tensor math of every training method (SPEC.md sections 1-4). No torch.distributed/megatron/vllm here.

Methods (one registered file each): `sft`, `sft_kl` (sft.py), `grpo`, `srft`, `superrl`, `sasr`, `srl`, and the
SPEC 10.C ones `luffy`, `chord`, `relift`, `hpt`, `dft`.
Shared pieces: losses.py (aggregation with global normalisation, clipped / demo surrogates, log-ratio clamp, SFT token
weights, KL k1/k2/k3), correction.py (rollout correction weights and drift statistics, SPEC 10.B),
advantages.py (group advantages, dynamic-sampling filter), common.py (token groups, statistics, PG/SFT terms).

Metric keys. "share" = additive share returned by `loss` (the caller sums over micro-batches and ranks);
"final" = from `metrics_from_stats`, `plan(step).metrics` or `after_step`. Keys appear only when they apply.

| key | kind | methods | meaning |
| --- | --- | --- | --- |
| `loss/sft` | share | sft, sft_kl, superrl, sasr (SFT step) | NLL part |
| `loss/kl`, `actor/kl` | share | any with a KL term on | KL part of the loss; token mean of the estimate |
| `loss/entropy` | share | PG methods with entropy_coef != 0 | entropy-bonus part |
| `loss/pg` | share | grpo, srl, superrl, sasr (GRPO step) | clipped-surrogate part |
| `loss/sft_demo`, `loss/rl_demo` | share | srft | w_sft NLL and off-policy demo surrogate |
| `loss/self` or `loss/self_pos`, `loss/self_neg` | share | srft | self-rollout term (grpo / reinforce) |
| `actor/clip_frac` | share | clipped-surrogate methods | fraction of PG tokens where the clipped term is taken |
| `entropy/demo`, `entropy/rollout`, `entropy/rollout_pos`, `entropy/rollout_neg` | share | by token group | mean current entropy |
| `srft/w_sft`, `srft/w_rl` | final (share with entropy_scope=token) | srft | entropy-aware weights |
| `superrl/sft_frac` | final | superrl | prompts routed to SFT that have a demo / B (uncertainty: prompts with a demo / B) |
| `superrl/pg_frac`, `superrl/no_signal`, `superrl/no_signal_frac` | final | superrl gates | PG fraction; count and fraction of prompts with c = 0 and no demo |
| `superrl/s_pg`, `superrl/s_sft`, `superrl/w_pg`, `superrl/w_sft` | final | superrl uncertainty | log-sigmas and exp(-2 s) |
| `sasr/p`, `sasr/is_sft` | final (plan) | sasr | SFT probability and the choice |
| `sasr/g_warmup`, `sasr/g_last_sft` | final (after_step) | sasr | recorded SFT grad norms |
| `reward/mean`, `response_length/mean` | final | steps with rollouts | over rollouts |
| `response_length/demo`, `batch/num_prompts` | final | steps with demos / all | demo length; prompts B |

| `mismatch/logp_abs_diff_mean`, `_max`, `mismatch/k1`, `mismatch/k3`, `mismatch/mult_prob_error` | final | every step with engine log-probs | engine/trainer drift (SPEC 10.B) |
| `rollout_corr/weight_mean|max|min`, `rollout_corr/ess`, `rollout_corr/clip_frac` or `masked_frac` | final | rollout.correction != none | correction weights |
| `luffy/*`, `chord/*`, `hpt/*`, `dft/*`, `relift/*` | share / final | those methods | see each file's docstring |

The grad norm is logged by the trainer (`actor/grad_norm`).
"""
from megahybrid.algorithms.registry import algorithm_names, get_algorithm, register_algorithm

__all__ = ["algorithm_names", "get_algorithm", "register_algorithm"]
