"""Policy checkpoints with `megatron.core.dist_checkpointing` and export to a Hugging Face folder.

Checkpoint content: the model's sharded tensors (keys use global layer numbers, so a checkpoint saved at one
TP/PP layout loads at another), the optimizer state in Megatron's reshardable format, the lr-scheduler state,
and `extra_state` (any picklable dict; global rank 0's copy is stored in `megahybrid_extra_state.pt` and returned
to every rank on load).
The writer runs in spawned processes: scripts that save need an `if __name__ == "__main__":` guard.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
from typing import Any

import torch
import torch.distributed as dist

from megahybrid.config.schema import ModelConfig
from megahybrid.model import convert
from megahybrid.model.hf_config import hf_config_dict, read_hf_config
from megahybrid.model.hf_io import HFCheckpointWriter

_META = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True,
         "singleton_local_shards": False}
EXTRA_STATE_FILE = "megahybrid_extra_state.pt"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def sharded_state_dict(policy, *, is_loading: bool = False) -> dict[str, Any]:
    """{"model": {"chunk<i>": ...}, "optimizer": ..., "scheduler": ...} for dist_checkpointing. The chunk keys
    are only containers: tensors are matched by their global sharded keys."""
    meta = dict(_META, dp_cp_group=policy.ps.dp_group)
    model = {f"chunk{i}": m.sharded_state_dict(prefix="", metadata=meta) for i, m in enumerate(policy.modules)}
    state: dict[str, Any] = {"model": model}
    if policy.trainable:
        if is_loading:
            _init_empty_distributed_optimizer_state(policy.optimizer)
        state["optimizer"] = policy.optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=meta)
        state["scheduler"] = policy.scheduler.state_dict()
    return state


def _init_empty_distributed_optimizer_state(optimizer) -> None:
    """Megatron's DistributedOptimizer.state_dict() asserts a single Adam `step` across states, which a fresh
    torch (non-Apex/TE) Adam does not have yet: give it placeholder states (overwritten by the load)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


def _unshare_adam_steps(optimizer) -> None:
    """Megatron restores torch Adam's `step` as ONE tensor object shared by every parameter's state; torch
    increments it in place per parameter, which would corrupt the bias correction. Give each state its own."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in (inner.state.values() if inner is not None else ()):
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


@contextlib.contextmanager
def _torch_adam_step_passthrough(optimizer):
    """Megatron 0.16's fully-reshardable load skips torch Adam's per-param `step` state (restored separately
    from the param groups) but then copies every state key, failing with KeyError('step'); Apex/TE FusedAdam
    (GPU) has no such key. For the duration of the load, a missing `step` is taken from the state it would
    overwrite (i.e. left as restored)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer):
            continue
        original = opt._set_main_param_and_optimizer_states

        def with_step(model_param, tensors, opt=opt, original=original):
            if "step" not in tensors:
                group, order = opt.model_param_group_index_map[model_param]
                state = opt.optimizer.state[opt.optimizer.param_groups[group]["params"][order]]
                if "step" in state:
                    tensors = {**tensors, "step": state["step"]}
            return original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = with_step
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
        _unshare_adam_steps(optimizer)


def save_checkpoint(policy, directory: str, extra_state: dict[str, Any]) -> None:
    from megatron.core import dist_checkpointing

    os.makedirs(directory, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(sharded_state_dict(policy), directory)
    if dist.get_rank() == 0:
        # Our own file, not dist_checkpointing's common state: that one is read back with torch.load's
        # weights_only default, which rejects e.g. numpy RNG states.
        torch.save(extra_state, os.path.join(directory, EXTRA_STATE_FILE))
    dist.barrier()


def load_checkpoint(policy, directory: str) -> dict[str, Any]:
    from megatron.core import dist_checkpointing

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    request = sharded_state_dict(policy, is_loading=True)
    loaded = dist_checkpointing.load(request, directory)
    for i, module in enumerate(policy.modules):
        module.load_state_dict(loaded["model"][f"chunk{i}"], strict=True)
    if policy.trainable:
        if "optimizer" not in loaded or "scheduler" not in loaded:
            raise KeyError(f"{directory}: checkpoint has no optimizer/scheduler state (saved from a frozen policy?)")
        with _torch_adam_step_passthrough(policy.optimizer):
            policy.optimizer.load_state_dict(loaded["optimizer"])
        policy.scheduler.load_state_dict(loaded["scheduler"])
    policy._sync_extra_parameters()
    extra_path = os.path.join(directory, EXTRA_STATE_FILE)
    return torch.load(extra_path, weights_only=False) if os.path.exists(extra_path) else {}


# ----------------------------------------------------------------------------------------------------- export
def _stage_tensors(policy):
    tp = convert.TPInfo(policy.ps.tp_rank, policy.ps.tp_size, policy.ps.tp_group)
    return convert.iter_stage_hf_tensors(policy.modules, policy.model_config, tp, policy.head.padded_vocab_size)


def _stream_to_writer(policy, writer: HFCheckpointWriter | None) -> None:
    """Pipeline stage s (in order) sends its TP-gathered tensors one by one to stage 0 over the PP group;
    only the (dp 0, tp 0) pipeline carries data, the other TP ranks only take part in the TP gathers."""
    ps = policy.ps
    for stage in range(ps.pp_size):
        if stage == ps.pp_rank:
            for name, tensor in _stage_tensors(policy):
                if ps.tp_rank != 0:
                    continue
                if stage == 0:
                    writer.add(name, tensor.cpu())
                    continue
                header = [(name, tuple(tensor.shape), tensor.dtype)]
                dist.send_object_list(header, group_dst=0, group=ps.pp_group)
                dist.send(tensor.contiguous().to(ps.device), group_dst=0, group=ps.pp_group)
            if stage != 0 and ps.tp_rank == 0:
                dist.send_object_list([None], group_dst=0, group=ps.pp_group)
        elif ps.pp_rank == 0 and ps.tp_rank == 0 and stage != 0:
            while True:
                header = [None]
                dist.recv_object_list(header, group_src=stage, group=ps.pp_group)
                if header[0] is None:
                    break
                name, shape, dtype = header[0]
                buf = torch.empty(shape, dtype=dtype, device=ps.device)
                dist.recv(buf, group_src=stage, group=ps.pp_group)
                writer.add(name, buf.cpu())


def effective_hf_config(original: dict[str, Any], m: ModelConfig) -> dict[str, Any]:
    """The checkpoint's config.json with the run's overrides of the effective ModelConfig `m` (RoPE theta and the
    context; every other architecture field comes from that config.json, see model_config_from_hf). The engines
    sample with it: with the original, vLLM refuses a longer `max_model_len` and, forced past that check, uses
    the old theta while the trainer uses the new one."""
    config = copy.deepcopy(original)
    if isinstance(config.get("rope_parameters"), dict):  # transformers >= 5
        config["rope_parameters"]["rope_theta"] = m.rope_theta
    if "rope_theta" in config or "rope_parameters" not in config:
        config["rope_theta"] = m.rope_theta
    config["max_position_embeddings"] = m.max_position_embeddings
    return config


def _write_config_and_tokenizer(policy, out_dir: str, tokenizer_dir: str | None) -> None:
    import json

    m = policy.model_config
    config = effective_hf_config(read_hf_config(m.hf_path), m) if m.hf_path else hf_config_dict(m)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tokenizer_dir = tokenizer_dir or m.tokenizer or m.hf_path
    if tokenizer_dir:
        for name in sorted(os.listdir(tokenizer_dir)):
            src = os.path.join(tokenizer_dir, name)
            if (os.path.isfile(src) and not name.endswith(_WEIGHT_SUFFIXES) and name != "config.json"
                    and not name.startswith("model.safetensors")):
                shutil.copy2(src, os.path.join(out_dir, name))


def export_hf(policy, out_dir: str, *, tokenizer_dir: str | None = None, max_shard_bytes: int = 2 << 30) -> None:
    """Write the policy's weights (TP-gathered, PP-collected) as an HF folder at `out_dir` on global rank 0 of
    data-parallel replica 0. Collective over all ranks."""
    ps = policy.ps
    writer = HFCheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes) \
        if (ps.dp_rank == 0 and ps.tp_rank == 0 and ps.pp_rank == 0) else None
    if ps.dp_rank == 0:
        _stream_to_writer(policy, writer)
    if writer is not None:
        writer.close()
        _write_config_and_tokenizer(policy, out_dir, tokenizer_dir)
    dist.barrier()
