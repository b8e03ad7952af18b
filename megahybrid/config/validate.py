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

    check = getattr(cfg.algorithm, "validate", None)
    if callable(check):
        problems.extend(f"algorithm.{p}" for p in check())
    return problems
