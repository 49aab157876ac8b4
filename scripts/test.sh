#!/usr/bin/env bash
# The test suite: set up, lint, run pytest. Model files are fetched once into
# .cache/models (or $SLOTMESH_TEST_CACHE) and reused by later runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export SLOTMESH_TEST_CACHE=${SLOTMESH_TEST_CACHE:-$PWD/.cache/models}
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
