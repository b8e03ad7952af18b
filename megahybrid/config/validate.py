"""Cross-section checks that no single field's type can express. Each problem names the dotted keys involved."""
from __future__ import annotations

from megahybrid.config.schema import RunConfig


def derived_data_parallel_size(cfg: RunConfig, world_size: int | None = None) -> int | None:
    """DP size from the config (explicit, or world_size / (TP*PP)); None when the world size is not known yet."""
    par = cfg.parallel
    if par.data_parallel_size is not None:
        return par.data_parallel_size
    world = world_size or par.world_size
    if world is None:
        return None
    return world // (par.tensor_model_parallel_size * par.pipeline_model_parallel_size)


DEFAULT_MICRO_BATCH_TOKENS = 2048
"""`train.max_tokens_per_micro_batch` when unset (raised to the longest sequence where that is longer). Sized for
CPU boxes like CI's: SmolLM2-135M (no activation recompute) holds ~1.8 MB of activations a token, so 2048 tokens
is ~4 GB on top of the model (measured: 1024 -> 6.4 GB peak RSS, 8192 -> 19 GB); GPU recipes with long
sequences get the longest sequence instead."""


def longest_sequence(cfg: RunConfig) -> int:
    """The most tokens one sequence of a training step can have (prompt + rollout or demo)."""
    return cfg.data.max_prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.data.max_demo_tokens)


def micro_batch_token_budget(cfg: RunConfig) -> int:
    """The effective `train.max_tokens_per_micro_batch`."""
    budget = cfg.train.max_tokens_per_micro_batch
    return budget if budget is not None else max(DEFAULT_MICRO_BATCH_TOKENS, longest_sequence(cfg))


def validate_config(cfg: RunConfig, world_size: int | None = None) -> list[str]:
    """Return a list of problems (empty when the config is consistent)."""
    problems: list[str] = []
    m, par, ro, tr, data = cfg.model, cfg.parallel, cfg.rollout, cfg.train, cfg.data
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size

    for key, value in (("parallel.tensor_model_parallel_size", tp), ("parallel.pipeline_model_parallel_size", pp),
                       ("model.num_layers", m.num_layers), ("model.num_attention_heads", m.num_attention_heads),
                       ("model.num_query_groups", m.num_query_groups), ("model.head_dim", m.head_dim),
                       ("rollout.n", ro.n), ("train.prompts_per_step", tr.prompts_per_step),
                       ("train.micro_batch_size", tr.micro_batch_size), ("rollout.num_workers", ro.num_workers)):
        if value < 1:
            problems.append(f"{key}: must be >= 1, got {value}")
    if problems:
        return problems

    if m.num_attention_heads % tp:
        problems.append(f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
                        f"parallel.tensor_model_parallel_size ({tp})")
    if m.num_query_groups % tp:
        problems.append(f"model.num_query_groups ({m.num_query_groups}) must be divisible by "
                        f"parallel.tensor_model_parallel_size ({tp})")
    if m.num_attention_heads % m.num_query_groups:
        problems.append(f"model.num_attention_heads ({m.num_attention_heads}) must be a multiple of "
                        f"model.num_query_groups ({m.num_query_groups})")
    if m.num_layers % pp:
        problems.append(f"model.num_layers ({m.num_layers}) must be divisible by "
                        f"parallel.pipeline_model_parallel_size ({pp})")
    vpp = par.virtual_pipeline_model_parallel_size
    if vpp is not None and (pp < 2 or m.num_layers % (pp * vpp)):
        problems.append(f"parallel.virtual_pipeline_model_parallel_size ({vpp}) needs pipeline size >= 2 and "
                        f"model.num_layers ({m.num_layers}) divisible by pipeline*virtual ({pp * (vpp or 1)})")
    if par.sequence_parallel and tp == 1:
        problems.append("parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1")

    world = world_size or par.world_size
    if world is not None:
        if world % (tp * pp):
            problems.append(f"trainer world size ({world}) must be divisible by tensor*pipeline parallel size "
                            f"({tp}*{pp}={tp * pp})")
        elif par.data_parallel_size is not None and tp * pp * par.data_parallel_size != world:
            problems.append(f"parallel: tensor*pipeline*data parallel size ({tp}*{pp}*{par.data_parallel_size}="
                            f"{tp * pp * par.data_parallel_size}) != world size ({world})")
    dp = derived_data_parallel_size(cfg, world_size)
    if dp and tr.prompts_per_step % dp:
        problems.append(f"train.prompts_per_step ({tr.prompts_per_step}) must be divisible by the data parallel "
                        f"size ({dp}): whole prompt groups live on one rank")

    ctx = m.max_position_embeddings
    if data.max_prompt_tokens + ro.max_new_tokens > ctx:
        problems.append(f"data.max_prompt_tokens + rollout.max_new_tokens ({data.max_prompt_tokens} + "
                        f"{ro.max_new_tokens}) exceeds model.max_position_embeddings ({ctx})")
    if data.max_prompt_tokens + data.max_demo_tokens > ctx:
        problems.append(f"data.max_prompt_tokens + data.max_demo_tokens ({data.max_prompt_tokens} + "
                        f"{data.max_demo_tokens}) exceeds model.max_position_embeddings ({ctx})")
    if tr.eval_max_new_tokens is not None and data.max_prompt_tokens + tr.eval_max_new_tokens > ctx:
        problems.append(f"data.max_prompt_tokens + train.eval_max_new_tokens ({data.max_prompt_tokens} + "
                        f"{tr.eval_max_new_tokens}) exceeds model.max_position_embeddings ({ctx})")

    budget, longest = tr.max_tokens_per_micro_batch, longest_sequence(cfg)
    if budget is not None and budget < longest:
        problems.append(f"train.max_tokens_per_micro_batch ({budget}) is below the longest sequence a step can "
                        f"hold: data.max_prompt_tokens + max(rollout.max_new_tokens, data.max_demo_tokens) = "
                        f"{longest}; raise it or leave it unset (auto)")

    launch = cfg.launch
    if launch.gpus_per_node > 0 and world is not None:
        total = launch.nodes * launch.gpus_per_node
        rollout_gpus = ro.num_workers * ro.gpus_per_worker
        if world + rollout_gpus > total:
            problems.append(f"launch: trainer GPUs ({world}) + rollout GPUs (rollout.num_workers*gpus_per_worker="
                            f"{rollout_gpus}) exceed launch.nodes*gpus_per_node ({total})")

    if launch.gpus_per_node > 0 and not problems:
        # cluster configs: the full layout + per-GPU memory plan (what `megahybrid plan` prints)
        from megahybrid.config.plan import plan_problems

        problems.extend(plan_problems(cfg))

    problems.extend(rollout_correction_problems(cfg))
    check = getattr(cfg.algorithm, "validate", None)
    if callable(check):
        problems.extend(f"algorithm.{p}" for p in check())
    n_demos = getattr(cfg.algorithm, "n_demos", None)
    if n_demos is not None and n_demos >= ro.n:
        problems.append(f"algorithm.n_demos ({n_demos}) must be < rollout.n ({ro.n}): the demos take n_demos of the "
                        f"rollout.n group slots and at least one rollout must remain")
    return problems


def rollout_correction_problems(cfg: RunConfig) -> list[str]:
    """SPEC 10.B/10.D: the rollout.correction keys against each other, algorithm.tis_cap and the method."""
    from megahybrid.algorithms.correction import Correction
    from megahybrid.algorithms.registry import get_algorithm

    ro, tis_cap = cfg.rollout, getattr(cfg.algorithm, "tis_cap", None)
    problems = []
    if tis_cap is not None and ro.correction not in ("none", "token_tis"):
        problems.append(f"algorithm.tis_cap ({tis_cap}) is an alias for rollout.correction=token_tis but "
                        f"rollout.correction is {ro.correction}; drop one of them")
    if tis_cap is not None and ro.is_cap is not None and tis_cap != ro.is_cap:
        problems.append(f"algorithm.tis_cap ({tis_cap}) and rollout.is_cap ({ro.is_cap}) are both set and differ; "
                        f"tis_cap is an alias for rollout.is_cap, set only one")
    if ro.is_cap is not None and ro.is_cap <= 0:
        problems.append(f"rollout.is_cap: must be > 0, got {ro.is_cap}")
    try:
        algo_cls = get_algorithm(cfg.algorithm.name)
    except KeyError:
        algo_cls = None  # an unknown name is reported by the loader
    corr = Correction.resolve(ro, cfg.algorithm)
    if ro.is_lo < 0 or ro.is_lo > corr.is_cap:
        problems.append(f"rollout.is_lo: must be in [0, rollout.is_cap ({corr.is_cap})], got {ro.is_lo}")
    if corr.mask_lo > corr.mask_hi:
        problems.append(f"rollout.mask_lo ({corr.mask_lo}) must be <= rollout.mask_hi ({corr.mask_hi})")
    if corr.mode != "none" and algo_cls is not None:
        if not algo_cls.needs_rollouts:
            problems.append(f"rollout.correction={corr.mode} needs engine log-probs, but algorithm "
                            f"{cfg.algorithm.name} trains without rollouts (set rollout.correction: none)")
    if ro.max_mismatch_k3 is not None and ro.max_mismatch_k3 < 0:
        problems.append(f"rollout.max_mismatch_k3: must be >= 0 (or null), got {ro.max_mismatch_k3}")
    if ro.mismatch_patience < 1:
        problems.append(f"rollout.mismatch_patience: must be >= 1, got {ro.mismatch_patience}")
    return problems
