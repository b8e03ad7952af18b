#!/usr/bin/env bash
# README command 2: set up .venv (idempotent) and run the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH"   # torchrun, megahybrid and friends for subprocess tests
# no arguments: setup.cfg testpaths (tests/); with arguments, only what they name
exec "$ROOT/.venv/bin/python" -m pytest "$@"
