# The two set-up-and-go commands (see README): `make demo` (train/push/serve the demo adapters, stream a mixed
# batch) and `make test` (the whole suite, as CI runs it). Both install into .venv/ first.
.PHONY: setup demo test lint protos docs

setup:
	tools/setup.sh

demo: setup
	.venv/bin/loraplex demo

test:
	tools/setup.sh --test
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check .
	tools/mypy.sh
	.venv/bin/buf lint

protos: setup
	.venv/bin/python tools/gen_protos.py

docs: setup
	.venv/bin/python tools/refresh_settings_tables.py
