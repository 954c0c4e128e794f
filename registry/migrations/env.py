"""Alembic environment: connects with the registry's own engine settings and targets the ORM metadata."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from loraplex.registry.db import Base, create_db_engine

MIGRATION_LOCK_KEY = 0x6C6F7261706C6578  # "loraplex": the advisory lock serialising concurrent migrations


def run_migrations_online() -> None:
    db_url = context.config.attributes.get("db_url") or context.config.get_main_option("sqlalchemy.url")
    if not db_url:
        raise RuntimeError("no database URL given to the registry migrations")
    engine = create_db_engine(db_url)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    # Registry replicas starting together all migrate: one at a time, the rest then find the
                    # schema current. The lock is the transaction's, released at commit or rollback.
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported; pass a database URL")
run_migrations_online()
