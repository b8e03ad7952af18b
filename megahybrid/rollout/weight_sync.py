"""Trainer side of `dir` weight sync: write Hugging Face-named tensors where every engine can read them."""
from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

WEIGHTS_FILE = "model.safetensors"


def save_hf_weights(state_dict: dict[str, Tensor], out_dir: str | os.PathLike) -> str:
    """Write `state_dict` (HF names) as `out_dir/model.safetensors`, atomically; returns `out_dir`.

    Other `*.safetensors` files in `out_dir` are removed (engines load every file there). Tensors that share
    storage (tied embeddings) are written once, under the first name.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[tuple[int, int]] = set()
    tensors = {}
    for name, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = t.detach().to("cpu").contiguous()
    tmp = out / f".{WEIGHTS_FILE}.tmp{os.getpid()}"
    save_file(tensors, str(tmp))
    os.replace(tmp, out / WEIGHTS_FILE)  # readers never see a half-written file
    for other in out.glob("*.safetensors"):
        if other.name != WEIGHTS_FILE:
            other.unlink()
    return str(out)
