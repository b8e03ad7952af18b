"""Rollout engines: the RolloutEngine protocol, VLLMEngine (one vllm.LLM), RolloutPool (engine processes) and
weight sync (shared safetensors folder, or a torch.distributed broadcast group).

Import VLLMEngine only inside an engine process: in-process vLLM changes torch's thread and RNG state.
"""
from megahybrid.rollout.types import RolloutEngine, RolloutError, RolloutSample, SamplingOptions, derive_seed

__all__ = ["RolloutEngine", "RolloutError", "RolloutSample", "SamplingOptions", "derive_seed", "RolloutPool",
           "save_hf_weights"]


def __getattr__(name: str):
    # lazy: the pool imports torch.distributed helpers and subprocess machinery only when used
    if name == "RolloutPool":
        from megahybrid.rollout.pool import RolloutPool

        return RolloutPool
    if name == "save_hf_weights":
        from megahybrid.rollout.weight_sync import save_hf_weights

        return save_hf_weights
    raise AttributeError(name)
