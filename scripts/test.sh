#!/usr/bin/env bash
# The test suite: set up, lint, run pytest. Model files are fetched once into
# ~/.cache/slotmesh (the CLI's cache; $SLOTMESH_TEST_CACHE overrides it) and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export SLOTMESH_TEST_CACHE=${SLOTMESH_TEST_CACHE:-$HOME/.cache/slotmesh}
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
