#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv/ with loraplex (editable) and everything the demo and the
# tests need. Re-running is cheap: pip is skipped while pyproject.toml/setup.py are unchanged.
#   tools/setup.sh          python packages
#   tools/setup.sh --test   also the system pieces the test suite uses (PostgreSQL 15 binaries, Node packages)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.loraplex-installed
want=$(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # The CPU wheel first: a bare "torch" requirement would pull several GB of CUDA packages.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi

if [ "${1:-}" = "--test" ]; then
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
      echo "note: PostgreSQL binaries not found; PostgreSQL tests will be skipped" >&2
    fi
  fi
  if [ -f examples/node/package.json ] && command -v npm >/dev/null; then
    (cd examples/node && npm install --silent --no-audit --no-fund >/dev/null)
  fi
fi
