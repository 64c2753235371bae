#!/usr/bin/env bash
# Install everything the test suite needs on a Debian machine, then run it.
#   tools/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS="qemu-utils qemu-system-common nbdkit libnbd-bin python3-libnbd nbd-client python3-venv openssl"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

# libnbd's Python module lives in Debian's Python: build the venv from it.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import nbd' 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/ruff check nbdfleece tests tools bench
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
