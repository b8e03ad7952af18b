"""Pure tensor math of every training method (SPEC.md sections 1-4). No torch.distributed/megatron/vllm here."""
from megahybrid.algorithms.registry import algorithm_names, get_algorithm, register_algorithm

__all__ = ["algorithm_names", "get_algorithm", "register_algorithm"]
