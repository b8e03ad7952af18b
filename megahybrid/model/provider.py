"""Builds the policy (and the frozen reference) from the run config: Megatron GPTModel chunks for this rank's
pipeline stage(s), weights from the HF checkpoint or a layout-independent random init, and, when trainable,
Megatron DDP + optimizer + learning-rate schedule."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from megahybrid.config.schema import ModelConfig, RunConfig
from megahybrid.model import convert, spec
from megahybrid.model.gpt import HeadInfo, PolicyGPTModel
from megahybrid.model.hf_config import model_config_from_hf, resolve_hf_path
from megahybrid.model.hf_io import HFCheckpointReader
from megahybrid.model.policy import Policy
from megahybrid.parallel.init import ParallelState


def effective_model_config(cfg: RunConfig) -> ModelConfig:
    """cfg.model, with the architecture read from `model.hf_path/config.json` when a checkpoint is given (a config
    built in code, not loaded from YAML, may still name `builtin:NAME`)."""
    m = cfg.model
    return model_config_from_hf(resolve_hf_path(m.hf_path), m) if m.hf_path else m


def check_layout(m: ModelConfig, cfg: RunConfig) -> None:
    par = cfg.parallel
    tp, pp, vpp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, \
        par.virtual_pipeline_model_parallel_size or 1
    problems = []
    if m.num_attention_heads % tp or m.num_query_groups % tp:
        problems.append(f"parallel.tensor_model_parallel_size ({tp}) must divide model.num_attention_heads "
                        f"({m.num_attention_heads}) and model.num_query_groups ({m.num_query_groups})")
    if m.ffn_hidden_size % tp:
        problems.append(f"parallel.tensor_model_parallel_size ({tp}) must divide model.ffn_hidden_size "
                        f"({m.ffn_hidden_size})")
    if m.num_layers % (pp * vpp):
        problems.append(f"model.num_layers ({m.num_layers}) must be divisible by pipeline * virtual pipeline "
                        f"size ({pp}*{vpp})")
    if problems:
        raise ValueError("; ".join(problems))


def _build_chunks(m: ModelConfig, cfg: RunConfig, use_gpu: bool, padded_vocab: int):
    from megatron.core import parallel_state

    config = spec.transformer_config(m, cfg.parallel, use_gpu=use_gpu)
    layer_spec = spec.layer_spec(use_gpu=use_gpu)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunk = PolicyGPTModel(
            config=config, transformer_layer_spec=layer_spec, vocab_size=padded_vocab,
            max_sequence_length=m.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=m.tie_word_embeddings, position_embedding_type="rope",
            rotary_base=m.rope_theta, parallel_output=True, vp_stage=stage)
        if use_gpu:
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return config, chunks


def _load_weights(chunks, m: ModelConfig, cfg: RunConfig, ps: ParallelState, padded_vocab: int) -> None:
    tp = convert.TPInfo(ps.tp_rank, ps.tp_size, ps.tp_group)
    if m.hf_path:
        with HFCheckpointReader(m.hf_path) as reader:
            convert.check_source(reader, m, m.hf_path)
            convert.load_into_megatron(chunks, reader, m, tp, padded_vocab)
    else:
        convert.load_into_megatron(chunks, convert.RandomSource(m, cfg.train.seed), m, tp, padded_vocab)


def _attach_extra(chunks, params: Sequence[torch.nn.Parameter], ps: ParallelState) -> None:
    """Learnable loss scalars hang on the last stage's last chunk (where the loss runs), so Megatron DDP reduces
    their gradients, the optimizer updates them and they are saved with the model."""
    for p in params:
        p.data = p.data.to(ps.device)
    if params and ps.is_last_stage:
        setattr(chunks[-1], convert.EXTRA_PREFIX, torch.nn.ParameterList(list(params)))


def optimizer_config(cfg: RunConfig, m: ModelConfig):
    from megatron.core.optimizer import OptimizerConfig

    o = cfg.optim
    dtype = spec.params_dtype(m)
    return OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        # clip_grad 0 = off; an infinite threshold keeps Megatron computing the global norm (SASR reads it).
        clip_grad=o.clip_grad if o.clip_grad > 0 else math.inf,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)


def lr_scheduler(optimizer, cfg: RunConfig):
    """Linear warm-up from 0 over `optim.warmup_steps`, then constant / cosine / linear decay to `optim.min_lr`
    at `train.steps` (Megatron's OptimizerParamScheduler; step 0 of a warm-up runs at lr 0)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    decay_steps = max(cfg.train.steps, o.warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=decay_steps, lr_decay_style=o.schedule,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=decay_steps, wd_incr_style="constant")


def _wrap_trainable(chunks, config, cfg: RunConfig, m: ModelConfig):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import get_megatron_optimizer

    from megahybrid.training.step import finalize_grads_without_token_scaling

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer, check_for_nan_in_grad=False,
        average_in_collective=False)
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                       disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]
    optimizer = get_megatron_optimizer(optimizer_config(cfg, m), wrapped)
    scheduler = lr_scheduler(optimizer, cfg)
    config.finalize_model_grads_func = finalize_grads_without_token_scaling
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [c.no_sync for c in wrapped]
    config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
    return wrapped, optimizer, scheduler


def build_policy(cfg: RunConfig, ps: ParallelState, *, extra_parameters: Sequence[torch.nn.Parameter] = (),
                 trainable: bool = True) -> Policy:
    """The policy on this rank: GPTModel chunk(s) of its pipeline stage, weights from `model.hf_path` (or the
    seeded random init), wrapped in Megatron DDP with optimizer and lr schedule when `trainable`.

    `extra_parameters` (replicated scalars such as SuperRL's log-sigmas) are trained by the same optimizer and
    saved in checkpoints; they live on the last pipeline stage and are broadcast to the others after each step.
    """
    m = effective_model_config(cfg)
    check_layout(m, cfg)
    use_gpu = ps.device.type == "cuda"
    padded_vocab = spec.padded_vocab_size(m.vocab_size, ps.tp_size)
    config, chunks = _build_chunks(m, cfg, use_gpu, padded_vocab)
    _load_weights(chunks, m, cfg, ps, padded_vocab)
    _attach_extra(chunks, list(extra_parameters), ps)
    head = HeadInfo(vocab_size=m.vocab_size, padded_vocab_size=padded_vocab, tp_rank=ps.tp_rank,
                    tp_size=ps.tp_size, tp_group=ps.tp_group, sequence_parallel=config.sequence_parallel,
                    impl=cfg.model.logprob_impl)
    if not trainable:
        for chunk in chunks:
            chunk.eval()
            chunk.requires_grad_(False)
        return Policy(cfg, ps, m, config, chunks, head, optimizer=None, scheduler=None,
                      extra_parameters=list(extra_parameters))
    wrapped, optimizer, scheduler = _wrap_trainable(chunks, config, cfg, m)
    return Policy(cfg, ps, m, config, wrapped, head, optimizer=optimizer, scheduler=scheduler,
                  extra_parameters=list(extra_parameters))


def build_reference(cfg: RunConfig, ps: ParallelState) -> Policy:
    """Frozen copy of the initial policy (same checkpoint / seed), no optimizer: only `logp_entropy`."""
    return build_policy(cfg, ps, trainable=False)
