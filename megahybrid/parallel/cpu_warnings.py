"""The third-party warnings a CPU run is known to print, and why each one is harmless there.

Without this, every rank prints about 20 lines from Megatron-Core and torch before the first step, which hides
the warnings that do matter. Only the exact messages below are silenced, only when CUDA is absent, and only in
the trainer ranks (`silence_known_cpu_warnings` is called before Megatron is imported); anything else stays visible.
On a GPU none of this applies: there the same messages would mean a missing fused kernel and are worth seeing.
"""
from __future__ import annotations

import warnings

KNOWN_CPU_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"Transformer Engine and Apex are not installed\. Falling back to", UserWarning,
     "TE and Apex provide fused CUDA kernels only; on CPU the torch optimizers, multi-tensor ops and clipping "
     "are the implementations that run"),
    (r"Apex is not installed\. Falling back to Torch Norm", UserWarning,
     "the local (non-TE) layer spec uses torch's LayerNorm/RMSNorm on CPU by design"),
    (r"full scope is deprecated\. Use empty cuda_graph_scope", UserWarning,
     "TransformerConfig's own default for cuda_graph_scope; CUDA graphs are never captured on CPU"),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", UserWarning,
     "Megatron's dist_checkpointing still builds torch ShardedTensors internally; nothing of ours uses them"),
    (r"`torch\.distributed\.reduce_op` is deprecated", FutureWarning,
     "an attribute read inside a library's import-time dispatcher, not a call we make"),
)
"""(message regex, category, why it is harmless on CPU). Add an entry only with its reason."""

CPU_MODE_LINE = "CPU mode: Megatron local layer spec, torch norms and optimizers, gloo process groups"
"""Printed once (rank 0) in place of the silenced warnings, so the fallback is still stated."""


def silence_known_cpu_warnings() -> None:
    """Install ignore filters for KNOWN_CPU_WARNINGS (this process only)."""
    for pattern, category, _why in KNOWN_CPU_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
