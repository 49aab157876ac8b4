#!/usr/bin/env bash
# redis-server from the OS packages when it is missing (Debian/Ubuntu, as root or with
# sudo). The tests and `slotmesh up` start their own redis-server on a free loopback
# port; nothing is started here.
set -euo pipefail
command -v redis-server >/dev/null && exit 0
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
if ! command -v apt-get >/dev/null; then
  echo "setup: redis-server is missing and apt-get is not available; install Redis (>= 6)" >&2
  exit 1
fi
echo "setup: installing redis-server from the OS packages"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q redis-server >/dev/null 2>&1 || {
  $SUDO apt-get update -q >/dev/null 2>&1
  $SUDO apt-get install -y -q redis-server >/dev/null
}
command -v redis-server >/dev/null
