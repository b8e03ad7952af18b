"""Streaming reads and sharded writes of Hugging Face safetensors checkpoints.

Reads go tensor by tensor (and row/column slice by slice) through `safetensors.safe_open`, so a rank never holds
more of the checkpoint than the shard it needs. Writes buffer tensors up to `max_shard_bytes` and flush HF-style
shards plus `model.safetensors.index.json`.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class HFCheckpointReader:
    """Tensor-by-tensor access to the safetensors weights of an HF folder."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index_path = os.path.join(hf_dir, INDEX_FILE)
        single_path = os.path.join(hf_dir, SINGLE_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            self._files = {name: os.path.join(hf_dir, fname) for name, fname in weight_map.items()}
        elif os.path.exists(single_path):
            with safe_open(single_path, framework="pt") as f:
                self._files = {name: single_path for name in f.keys()}
        else:
            found = sorted(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else "no such directory"
            raise FileNotFoundError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE} (found: {found}); convert "
                                    f"pytorch_model.bin / GGUF checkpoints to safetensors first")
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return sorted(self._files)

    def has(self, name: str) -> bool:
        return name in self._files

    def _handle(self, name: str):
        if name not in self._files:
            raise KeyError(f"{self.hf_dir}: tensor {name!r} not in the checkpoint")
        path = self._files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """The tensor `name`, or only `[rows]` / `[:, cols]` of it (read from disk without the rest)."""
        sl = self._handle(name).get_slice(name)
        if rows is None and cols is None:
            return sl[:]
        if cols is None:
            return sl[rows]
        return sl[rows if rows is not None else slice(None), cols]

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "HFCheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HFCheckpointWriter:
    """Writes tensors in the order given into HF safetensors shards of at most `max_shard_bytes` each."""

    def __init__(self, out_dir: str, *, max_shard_bytes: int = 2 << 30):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        os.makedirs(out_dir, exist_ok=True)
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.detach().contiguous()
        self._buffer_bytes += nbytes
        self._total_bytes += nbytes

    def add_all(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in items:
            self.add(name, tensor)

    def _flush(self) -> None:
        idx = len(self._shards)
        save_file(self._buffer, os.path.join(self.out_dir, f"shard-{idx:05d}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> None:
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(os.path.join(self.out_dir, "shard-00000.tmp"), os.path.join(self.out_dir, SINGLE_FILE))
            return
        weight_map = {}
        for i, names in enumerate(self._shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, f"shard-{i:05d}.tmp"), os.path.join(self.out_dir, fname))
            weight_map.update({name: fname for name in names})
        with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}, f, indent=2)
