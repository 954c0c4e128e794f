"""SQLAlchemy 2 ORM rows for the registry, identical on SQLite and PostgreSQL.

Why these constraints: every race in the registry is settled by the database, not by locks in Python. Unique
(adapter, version) and (adapter, request_id) make concurrent uploads and retried uploads safe; a per-adapter
``version_counter`` hands out numbers under the adapter's row lock, so numbers are never reused after a delete.
Labels live in their own table so label filters are indexed joins instead of JSON scans.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Connection,
    DateTime,
    Dialect,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    make_url,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.pool import StaticPool

from loraplex.registry.entities import Adapter, AdapterVersion, BaseModel, VersionState
from loraplex.registry.spec import ModelSpec

# Execution option a write scope sets so SQLite takes the write lock at BEGIN (ignored elsewhere).
SQLITE_BEGIN_OPTION = "loraplex_sqlite_begin"

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both back ends (SQLite drops tzinfo; we put it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class BaseModelRow(Base):
    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    config_json: Mapped[str] = mapped_column(Text)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime())

    def to_entity(self) -> BaseModel:
        return BaseModel(
            name=self.name,
            spec=ModelSpec.from_config(json.loads(self.config_json)),
            config_json=self.config_json,
            create_time=self.create_time,
        )


class AdapterRow(Base):
    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(127), unique=True)
    namespace: Mapped[str] = mapped_column(String(63), index=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    description: Mapped[str] = mapped_column(Text)
    etag: Mapped[str] = mapped_column(String(64))
    version_counter: Mapped[int] = mapped_column(Integer)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime())
    update_time: Mapped[datetime] = mapped_column(UTCDateTime())

    base_model: Mapped[BaseModelRow] = relationship(lazy="joined", innerjoin=True)

    def to_entity(self, labels: dict[str, str], aliases: dict[str, int], latest_version: int | None) -> Adapter:
        return Adapter(
            name=self.name,
            namespace=self.namespace,
            base_model=self.base_model.name,
            description=self.description,
            labels=dict(sorted(labels.items())),
            aliases=dict(sorted(aliases.items())),
            latest_version=latest_version,
            etag=self.etag,
            create_time=self.create_time,
            update_time=self.update_time,
        )


class LabelRow(Base):
    __tablename__ = "adapter_labels"
    __table_args__ = (Index("ix_adapter_labels_key_value", "key", "value"),)

    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(63), primary_key=True)
    value: Mapped[str] = mapped_column(String(63))


class VersionRow(Base):
    __tablename__ = "versions"
    __table_args__ = (
        UniqueConstraint("adapter_id", "version"),
        UniqueConstraint("adapter_id", "request_id"),
        Index("ix_versions_adapter_id_digest", "adapter_id", "digest"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(71))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    blob_key: Mapped[str] = mapped_column(String(255), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))
    state_message: Mapped[str] = mapped_column(Text)
    rank: Mapped[int] = mapped_column(Integer)
    module_ranks: Mapped[dict[str, int]] = mapped_column(JSON)
    lora_alpha: Mapped[float] = mapped_column(Float)
    use_rslora: Mapped[bool] = mapped_column(Boolean)
    rank_pattern: Mapped[dict[str, int]] = mapped_column(JSON)
    alpha_pattern: Mapped[dict[str, float]] = mapped_column(JSON)
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    dtype: Mapped[str] = mapped_column(String(8))
    adapter_config_json: Mapped[str] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(String(128))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime())

    def to_entity(self, adapter_name: str, base_model: str, aliases: Iterable[str]) -> AdapterVersion:
        return AdapterVersion(
            adapter=adapter_name,
            version=self.version,
            digest=self.digest,
            weights_sha256=self.weights_sha256,
            size_bytes=self.size_bytes,
            state=VersionState(self.state),
            state_message=self.state_message,
            rank=self.rank,
            module_ranks=dict(self.module_ranks),
            lora_alpha=self.lora_alpha,
            use_rslora=self.use_rslora,
            rank_pattern=dict(self.rank_pattern),
            alpha_pattern=dict(self.alpha_pattern),
            target_modules=tuple(self.target_modules),
            dtype=self.dtype,
            base_model=base_model,
            adapter_config_json=self.adapter_config_json,
            blob_key=self.blob_key,
            request_id=self.request_id or "",
            aliases=tuple(sorted(aliases)),
            create_time=self.create_time,
        )


class AliasRow(Base):
    __tablename__ = "aliases"

    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(63), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)


def create_db_engine(db_url: str) -> Engine:
    """An engine with the per-dialect settings the store relies on.

    SQLite: foreign keys on, WAL (readers never block the writer), a generous busy timeout, and explicit
    ``BEGIN`` / ``BEGIN IMMEDIATE`` so a write transaction takes the write lock up front instead of failing
    with "database is locked" when it upgrades from reading (the pysqlite driver's own BEGIN handling is off).
    PostgreSQL: pre-ping so a restarted server does not hand out dead pooled connections.
    """
    url = make_url(db_url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    memory = url.database in (None, "", ":memory:")
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30},
        poolclass=StaticPool if memory else None,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (see below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        if not memory:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(SQLITE_BEGIN_OPTION, "")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if mode == "immediate" else "BEGIN")

    return engine
