"""The Alembic migrations produce exactly the ORM schema, on SQLite and PostgreSQL, and are re-runnable."""

from __future__ import annotations

import subprocess

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from loraplex.registry.db import Base, create_db_engine
from loraplex.registry.migrations import migrate
from tests.fixtures.backends import Backend
from tests.fixtures.procs import LORAPLEX


def test_migrations_equal_orm_metadata(registry_backend: Backend) -> None:
    migrate(registry_backend.db_url)
    migrate(registry_backend.db_url)  # idempotent: already at head
    engine = create_db_engine(registry_backend.db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            assert context.get_current_revision() == "0001"
            tables = set(inspect(connection).get_table_names())
        assert {"base_models", "adapters", "adapter_labels", "versions", "aliases"} <= tables
    finally:
        engine.dispose()


def test_replicas_migrating_at_once_all_succeed(fresh_postgres_url: str) -> None:
    """Registry replicas starting together on an empty PostgreSQL each run ``migrate``: one migrates, the others
    wait on the advisory lock and find the schema current (without it, all but one fail on CREATE TABLE).
    Separate processes, as replicas are (Alembic itself is not thread-safe)."""
    command = [LORAPLEX, "registry", "migrate", "--db", fresh_postgres_url]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, outputs
    engine = create_db_engine(fresh_postgres_url)
    try:
        with engine.connect() as connection:
            assert MigrationContext.configure(connection).get_current_revision() == "0001"
    finally:
        engine.dispose()
