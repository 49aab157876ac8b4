#!/usr/bin/env bash
# Idempotent setup: redis-server from the OS packages when missing, a virtualenv in
# .venv with the CPU torch wheel and slotmesh itself, and slotmesh's native CPU ops built.
# The pip steps are scripts/install-python.sh, the same script the container images run.
# torch is pinned to 2.13.0 there (its wheel lies on this machine's disk); nothing
# else may pull another torch, so it is installed first and the rest sees it satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-redis.sh
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.slotmesh-installed
want="$(cat pyproject.toml scripts/setup.sh scripts/install-python.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing torch 2.13.0 (CPU) and slotmesh[dev] into .venv (log: .venv/setup.log)"
  if ! bash scripts/install-python.sh .venv/bin/python dev > .venv/setup.log 2>&1; then
    tail -n 30 .venv/setup.log >&2
    echo "setup: failed; full log in .venv/setup.log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
# slotmesh's native CPU ops (kernels/native.py): built once into ~/.cache/slotmesh/native
# and reused; without a working C++ compiler the worker keeps plain torch ops instead
if ! .venv/bin/python -m kernels.native > /dev/null 2> .venv/native-build.log; then
  echo "setup: native ops not built (see .venv/native-build.log); plain torch ops are used"
fi
