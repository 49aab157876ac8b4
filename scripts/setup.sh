#!/usr/bin/env bash
# Idempotent setup: redis-server from the OS packages when missing, and a virtualenv in
# .venv with the CPU torch wheel and slotmesh itself.
# torch is pinned to 2.13.0 explicitly (its wheel lies on this machine's disk); nothing
# else may pull another torch, so it is installed first and the rest sees it satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-redis.sh
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.slotmesh-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing torch 2.13.0 (CPU) and slotmesh[dev] into .venv (log: .venv/setup.log)"
  if ! {
    .venv/bin/python -m pip install --upgrade pip &&
    .venv/bin/python -m pip install torch==2.13.0 &&
    .venv/bin/python -m pip install -e ".[dev]"
  } > .venv/setup.log 2>&1; then
    tail -n 30 .venv/setup.log >&2
    echo "setup: failed; full log in .venv/setup.log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
