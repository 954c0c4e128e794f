# The two set-up-and-go commands (see README): `make demo` (train/push/serve the demo adapters, stream a mixed
# batch) and `make test` (the whole suite, as CI runs it). Both install into .venv/ first.
.PHONY: setup demo test lint protos protos-baseline docs

setup:
	tools/setup.sh

demo: setup
	.venv/bin/loraplex demo

test:
	tools/setup.sh --test
	.venv/bin/python -m pytest -q

# The protos are a contract: buf lint (STANDARD + COMMENTS), then no breaking change against the released
# baseline nor against main (a branch that breaks what main promises); tools/gen_protos.py says why both.
lint: setup
	.venv/bin/ruff check .
	tools/mypy.sh
	.venv/bin/buf lint
	.venv/bin/buf breaking --against tools/protos_baseline.json
	if git rev-parse -q --verify main >/dev/null; then .venv/bin/buf breaking --against '.git#branch=main'; fi

protos: setup
	.venv/bin/python tools/gen_protos.py

# Freeze the current protos as the contract `buf breaking` defends (on release only).
protos-baseline: setup
	.venv/bin/python tools/gen_protos.py --baseline

docs: setup
	.venv/bin/python tools/refresh_settings_tables.py
