"""The Alembic migrations produce exactly the ORM schema, on SQLite and PostgreSQL, and are re-runnable."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from loraplex.registry.db import Base, create_db_engine
from loraplex.registry.migrations import migrate
from tests.fixtures.backends import Backend


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
