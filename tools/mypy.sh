#!/usr/bin/env bash
# Type-check every package by its import name (mypy cannot follow the editable install's folder mapping).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .mypy_root/loraplex
for pkg in engine registry kernels services; do ln -sfn "../../$pkg" ".mypy_root/loraplex/$pkg"; done
exec .venv/bin/mypy -p loraplex.registry -p loraplex.kernels -p loraplex.engine -p loraplex.services "$@"
