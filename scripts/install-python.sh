#!/usr/bin/env bash
# The Python install steps, one copy for CI and the images: scripts/setup.sh (what CI
# runs) calls it with `dev`, deploy/docker/*.Dockerfile call it with `worker` or
# `router` (tests/deploy/test_deploy_docker.py checks that they do).
#
#   scripts/install-python.sh PYTHON dev      torch, then `pip install -e ".[dev]"`
#   scripts/install-python.sh PYTHON worker   torch, then the package (no extras)
#   scripts/install-python.sh PYTHON router   the package without torch: only what the
#                                             router and the gateway import (grpc,
#                                             protobuf, redis, prometheus, starlette,
#                                             uvicorn, httptools), at pyproject's versions
#
# torch is pinned here and installed first, so nothing else pulls another build.
# TORCH_INDEX_URL picks the build: unset = pip's configured index (on CI the local CPU
# wheel); the CPU image sets the PyTorch CPU index, the GPU image its CUDA index.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
ROUTER_DEPS="grpcio grpcio-health-checking grpcio-reflection protobuf redis prometheus-client starlette uvicorn httptools"
py=$1
target=$2

install_torch() {
  "$py" -m pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    "torch==$TORCH_VERSION"
}

router_requirements() {  # pyproject's own specifiers for the router's dependencies
  "$py" - "$ROUTER_DEPS" <<'PY'
import re, sys, tomllib
wanted = set(sys.argv[1].split())
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
found = {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0]: d for d in deps}
missing = wanted - found.keys()
if missing:
    sys.exit(f"install-python.sh: not in pyproject dependencies: {sorted(missing)}")
print("\n".join(found[name] for name in sorted(wanted)))
PY
}

"$py" -m pip install --upgrade pip
case "$target" in
  dev)
    install_torch
    "$py" -m pip install -e ".[dev]" ;;
  worker)
    install_torch
    "$py" -m pip install --no-cache-dir . ;;
  router)
    mapfile -t reqs < <(router_requirements)
    "$py" -m pip install --no-cache-dir "${reqs[@]}"
    "$py" -m pip install --no-cache-dir --no-deps . ;;
  *)
    echo "usage: $0 PYTHON dev|worker|router" >&2
    exit 2 ;;
esac
