"""Megatron-Core TransformerConfig, layer spec and vocabulary padding for the Llama and Qwen2/2.5 families.

Both families are the same GPT block: RMSNorm pre-norm, GQA attention with non-interleaved RoPE (HF's
`rotate_half` layout), SwiGLU MLP (`gated_linear_unit` + silu), no linear biases except Qwen2's QKV bias.
CPU: Megatron's local spec (plain torch modules). GPU: the Transformer Engine spec (imported lazily).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megahybrid.config.schema import ModelConfig, ParallelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def params_dtype(mcfg: ModelConfig) -> torch.dtype:
    return _DTYPES[mcfg.params_dtype]


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Vocabulary padded to a multiple of the tensor-parallel size (padded rows are zero and masked out of every
    softmax: the log-prob op gets the true `vocab_size`)."""
    return -(-vocab_size // tp_size) * tp_size


def transformer_config(m: ModelConfig, par: ParallelConfig, *, use_gpu: bool):
    """The TransformerConfig of the policy at the configured parallel layout."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = params_dtype(m)
    if not use_gpu and dtype != torch.float32:
        raise ValueError(f"model.params_dtype: {m.params_dtype!r} is GPU-only here; CPU runs use 'float32'")
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
        if m.recompute_activations else {}
    return TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups, kv_channels=m.head_dim,
        normalization="RMSNorm", layernorm_epsilon=m.norm_epsilon, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=m.qkv_bias, rotary_interleaved=False,
        hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True,
        init_method_std=m.init_method_std, use_cpu_initialization=not use_gpu,
        # Megatron sets the tensor-parallel attributes of weights inside its init routines, which the grad norm
        # and checkpoints rely on: keep them on even though the weights are overwritten right after.
        perform_initialization=True,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        sequence_parallel=par.sequence_parallel and use_gpu,
        # Losses arrive already normalised by global counts (DESIGN rule 2): no 1/num_microbatches, no DP mean.
        calculate_per_token_loss=True,
        # Fused CUDA kernels exist only on GPU.
        bias_activation_fusion=use_gpu, masked_softmax_fusion=use_gpu, bias_dropout_fusion=use_gpu,
        apply_rope_fusion=False, persist_layer_norm=use_gpu, gradient_accumulation_fusion=False,
        # batch_p2p_comm calls torch.cuda.synchronize between isend/irecv batches; plain p2p works on gloo.
        batch_p2p_comm=use_gpu, deallocate_pipeline_outputs=True, variable_seq_lengths=False,
        **recompute)


def layer_spec(*, use_gpu: bool):
    """Transformer-layer spec: Transformer Engine on GPU, Megatron's local (torch) modules on CPU."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_gpu:
        try:
            import transformer_engine  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("the GPU layer spec needs Transformer Engine: pip install "
                               "'transformer-engine[pytorch]' (megahybrid[gpu])") from exc
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
