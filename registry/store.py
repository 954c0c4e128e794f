"""SQL metadata store: every public method is one transaction, rows leave as frozen entities.

Why this shape: one ``session_scope`` owns commit/rollback and the translation of driver errors into domain
errors, so no caller ever sees SQLAlchemy. Races (two uploads, two alias writes) are settled by unique
constraints and retried in a fresh session; private helpers take the session explicitly so it is obvious which
transaction a query runs in. Input is assumed validated by the service layer.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Select, delete, func, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from loraplex.registry.db import (
    SQLITE_BEGIN_OPTION,
    AdapterRow,
    AliasRow,
    BaseModelRow,
    LabelRow,
    VersionRow,
    create_db_engine,
    utcnow,
)
from loraplex.registry.entities import Adapter, AdapterVersion, BaseModel, VersionState
from loraplex.registry.errors import (
    AdapterNotFound,
    AliasNotFound,
    AlreadyExists,
    BaseModelNotFound,
    Conflict,
    FailedPrecondition,
    NotFound,
    Unavailable,
    VersionNotFound,
)
from loraplex.registry.refs import AdapterRef

MAX_INSERT_ATTEMPTS = 50
READY = VersionState.READY.value


@dataclass(frozen=True)
class NewVersion:
    """Everything the service has validated about an upload, ready to become a READY version row."""

    digest: str
    weights_sha256: str
    blob_key: str
    size_bytes: int
    rank: int
    module_ranks: Mapping[str, int]
    lora_alpha: float
    use_rslora: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    target_modules: tuple[str, ...]
    dtype: str
    adapter_config_json: str
    request_id: str


def _is_foreign_key_error(exc: IntegrityError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == "23503" or "FOREIGN KEY" in str(exc.orig).upper()


def version_not_found(message: str) -> NotFound:
    return VersionNotFound(message)


class SqlMetadataStore:
    """Registry metadata in SQLite or PostgreSQL (``postgresql+psycopg://``). Thread-safe."""

    def __init__(self, db_url: str) -> None:
        self.engine = create_db_engine(db_url)
        self._sqlite = self.engine.dialect.name == "sqlite"
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session_scope(self, *, write: bool = False) -> Iterator[Session]:
        """One transaction: commit on success, rollback on error, driver errors become domain errors."""
        session = self._sessions()
        try:
            if write and self._sqlite:
                session.connection(execution_options={SQLITE_BEGIN_OPTION: "immediate"})
            yield session
            session.commit()
        except IntegrityError as exc:
            session.rollback()
            if _is_foreign_key_error(exc):
                raise Conflict(
                    "concurrent change to related rows; retry", reason="CONCURRENT_CHANGE", detail=str(exc.orig)
                ) from exc
            raise AlreadyExists("already exists (a concurrent write won)", detail=str(exc.orig)) from exc
        except (OperationalError, InterfaceError) as exc:
            session.rollback()
            # The driver's text names the database host, port and user: for the server log only.
            raise Unavailable("metadata database unavailable", detail=str(exc.orig)) from exc
        except DBAPIError as exc:
            session.rollback()
            if exc.connection_invalidated:
                raise Unavailable("metadata database connection lost", detail=str(exc.orig)) from exc
            raise
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    # ---------------------------------------------------------------- helpers (explicit session)

    def _base_model_row(self, session: Session, name: str) -> BaseModelRow:
        row = session.scalar(select(BaseModelRow).where(BaseModelRow.name == name))
        if row is None:
            raise BaseModelNotFound(f"base model {name!r} not found")
        return row

    def _adapter_row(self, session: Session, name: str) -> AdapterRow:
        row = session.scalar(select(AdapterRow).where(AdapterRow.name == name))
        if row is None:
            raise AdapterNotFound(f"adapter {name!r} not found")
        return row

    def _adapters(self, session: Session, rows: Sequence[AdapterRow]) -> list[Adapter]:
        """Entities for ``rows`` with labels, aliases and latest version in three queries for the whole page."""
        ids = [row.id for row in rows]
        labels: dict[int, dict[str, str]] = {i: {} for i in ids}
        aliases: dict[int, dict[str, int]] = {i: {} for i in ids}
        if not ids:
            return []
        for label in session.scalars(select(LabelRow).where(LabelRow.adapter_id.in_(ids))):
            labels[label.adapter_id][label.key] = label.value
        alias_rows = session.execute(
            select(AliasRow.adapter_id, AliasRow.alias, VersionRow.version)
            .join(VersionRow, VersionRow.id == AliasRow.version_id)
            .where(AliasRow.adapter_id.in_(ids))
        )
        for adapter_id, alias, version in alias_rows:
            aliases[adapter_id][alias] = version
        latest: dict[int, int] = {
            adapter_id: version
            for adapter_id, version in session.execute(
                select(VersionRow.adapter_id, func.max(VersionRow.version))
                .where(VersionRow.adapter_id.in_(ids), VersionRow.state == READY)
                .group_by(VersionRow.adapter_id)
            )
        }
        return [row.to_entity(labels[row.id], aliases[row.id], latest.get(row.id)) for row in rows]

    def _versions(self, session: Session, adapter: AdapterRow, rows: Sequence[VersionRow]) -> list[AdapterVersion]:
        by_version: dict[int, list[str]] = {row.id: [] for row in rows}
        if rows:
            for version_id, alias in session.execute(
                select(AliasRow.version_id, AliasRow.alias).where(AliasRow.version_id.in_(list(by_version)))
            ):
                by_version[version_id].append(alias)
        return [row.to_entity(adapter.name, adapter.base_model.name, by_version[row.id]) for row in rows]

    def _touch(self, adapter: AdapterRow) -> None:
        adapter.etag = uuid.uuid4().hex
        adapter.update_time = utcnow()

    # ---------------------------------------------------------------- base models

    def add_base_model(self, name: str, config_json: str) -> BaseModel:
        """Insert, or return the existing row when its config is the same JSON; otherwise AlreadyExists."""
        for _ in range(2):
            try:
                with self.session_scope(write=True) as session:
                    row = session.scalar(select(BaseModelRow).where(BaseModelRow.name == name))
                    if row is not None:
                        if json.loads(row.config_json) != json.loads(config_json):
                            raise AlreadyExists(f"base model {name!r} is already registered with a different config")
                        return row.to_entity()
                    row = BaseModelRow(name=name, config_json=config_json, create_time=utcnow())
                    session.add(row)
                    session.flush()
                    return row.to_entity()
            except AlreadyExists as exc:
                if exc.__cause__ is None:
                    raise
        raise AlreadyExists(f"base model {name!r} was registered concurrently")

    def get_base_model(self, name: str) -> BaseModel:
        with self.session_scope() as session:
            return self._base_model_row(session, name).to_entity()

    def list_base_models(self, after: str | None, limit: int) -> list[BaseModel]:
        with self.session_scope() as session:
            query = select(BaseModelRow).order_by(BaseModelRow.name).limit(limit)
            if after is not None:
                query = query.where(BaseModelRow.name > after)
            return [row.to_entity() for row in session.scalars(query)]

    # ---------------------------------------------------------------- adapters

    def create_adapter(
        self, name: str, namespace: str, base_model: str, description: str, labels: Mapping[str, str]
    ) -> Adapter:
        with self.session_scope(write=True) as session:
            base = self._base_model_row(session, base_model)
            if session.scalar(select(AdapterRow.id).where(AdapterRow.name == name)) is not None:
                raise AlreadyExists(f"adapter {name!r} already exists")
            now = utcnow()
            row = AdapterRow(
                name=name,
                namespace=namespace,
                base_model=base,
                description=description,
                etag=uuid.uuid4().hex,
                version_counter=0,
                create_time=now,
                update_time=now,
            )
            session.add(row)
            session.flush()
            session.add_all(LabelRow(adapter_id=row.id, key=k, value=v) for k, v in labels.items())
            session.flush()
            return self._adapters(session, [row])[0]

    def get_adapter(self, name: str) -> Adapter:
        with self.session_scope() as session:
            return self._adapters(session, [self._adapter_row(session, name)])[0]

    def list_adapters(
        self,
        after: str | None,
        limit: int,
        base_model: str | None = None,
        labels: Mapping[str, str] | None = None,
        namespaces: Collection[str] | None = None,
    ) -> list[Adapter]:
        with self.session_scope() as session:
            query: Select[AdapterRow] = select(AdapterRow).order_by(AdapterRow.name).limit(limit)
            if after is not None:
                query = query.where(AdapterRow.name > after)
            if base_model is not None:
                query = query.where(
                    AdapterRow.base_model_id.in_(select(BaseModelRow.id).where(BaseModelRow.name == base_model))
                )
            for key, value in (labels or {}).items():
                query = query.where(
                    AdapterRow.id.in_(select(LabelRow.adapter_id).where(LabelRow.key == key, LabelRow.value == value))
                )
            if namespaces is not None:
                query = query.where(AdapterRow.namespace.in_(sorted(namespaces)))
            return self._adapters(session, list(session.scalars(query)))

    def update_adapter(
        self, name: str, description: str | None, labels: Mapping[str, str] | None, etag: str
    ) -> Adapter:
        with self.session_scope(write=True) as session:
            row = self._adapter_row(session, name)
            if etag and etag != row.etag:
                raise Conflict(f"adapter {name!r} changed since it was read (etag mismatch)")
            values: dict[str, object] = {"etag": uuid.uuid4().hex, "update_time": utcnow()}
            if description is not None:
                values["description"] = description
            # Compare-and-set on the etag read above, so of two concurrent updates exactly one wins.
            result = session.execute(
                update(AdapterRow)
                .where(AdapterRow.id == row.id, AdapterRow.etag == row.etag)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if getattr(result, "rowcount", 1) != 1:
                raise Conflict(f"adapter {name!r} changed concurrently; re-read and retry")
            if labels is not None:
                session.execute(delete(LabelRow).where(LabelRow.adapter_id == row.id))
                session.add_all(LabelRow(adapter_id=row.id, key=k, value=v) for k, v in labels.items())
                session.flush()
            session.refresh(row)
            return self._adapters(session, [row])[0]

    def delete_adapter(self, name: str, etag: str, force: bool) -> None:
        with self.session_scope(write=True) as session:
            row = self._adapter_row(session, name)
            if etag and etag != row.etag:
                raise Conflict(f"adapter {name!r} changed since it was read (etag mismatch)")
            has_versions = session.scalar(select(VersionRow.id).where(VersionRow.adapter_id == row.id).limit(1))
            if has_versions is not None and not force:
                raise FailedPrecondition(
                    f"adapter {name!r} still has versions: delete them first, or delete with force (CLI: --force)",
                    reason="ADAPTER_HAS_VERSIONS",
                )
            session.execute(delete(AliasRow).where(AliasRow.adapter_id == row.id))
            session.execute(delete(VersionRow).where(VersionRow.adapter_id == row.id))
            session.execute(delete(LabelRow).where(LabelRow.adapter_id == row.id))
            session.execute(delete(AdapterRow).where(AdapterRow.id == row.id))

    # ---------------------------------------------------------------- versions

    def find_version_by_request_id(self, adapter: str, request_id: str) -> AdapterVersion | None:
        with self.session_scope() as session:
            row = self._adapter_row(session, adapter)
            version = session.scalar(
                select(VersionRow).where(VersionRow.adapter_id == row.id, VersionRow.request_id == request_id)
            )
            return self._versions(session, row, [version])[0] if version is not None else None

    def add_version(self, adapter: str, new: NewVersion) -> AdapterVersion:
        """Insert a READY version with the next number; retried in a fresh session when a constraint trips.

        Numbers come from the adapter's ``version_counter`` (incremented under its row lock in the same
        transaction), so concurrent uploads get 1..N without gaps and a deleted number is never reused. A retry
        whose ``request_id`` already landed returns that version (idempotent upload).
        """
        last: AlreadyExists | None = None
        for _ in range(MAX_INSERT_ATTEMPTS):
            try:
                with self.session_scope(write=True) as session:
                    row = self._adapter_row(session, adapter)
                    if new.request_id:
                        existing = session.scalar(
                            select(VersionRow).where(
                                VersionRow.adapter_id == row.id, VersionRow.request_id == new.request_id
                            )
                        )
                        if existing is not None:
                            if existing.digest != new.digest:
                                raise AlreadyExists(
                                    f"request_id {new.request_id!r} was already used for a different upload "
                                    f"(version {existing.version})",
                                    reason="REQUEST_ID_REUSED",
                                )
                            return self._versions(session, row, [existing])[0]
                    number = session.execute(
                        update(AdapterRow)
                        .where(AdapterRow.id == row.id)
                        .values(version_counter=AdapterRow.version_counter + 1)
                        .returning(AdapterRow.version_counter)
                        .execution_options(synchronize_session=False)
                    ).scalar_one()
                    version = VersionRow(
                        adapter_id=row.id,
                        version=number,
                        digest=new.digest,
                        weights_sha256=new.weights_sha256,
                        blob_key=new.blob_key,
                        size_bytes=new.size_bytes,
                        state=READY,
                        state_message="",
                        rank=new.rank,
                        module_ranks=dict(new.module_ranks),
                        lora_alpha=new.lora_alpha,
                        use_rslora=new.use_rslora,
                        rank_pattern=dict(new.rank_pattern),
                        alpha_pattern=dict(new.alpha_pattern),
                        target_modules=list(new.target_modules),
                        dtype=new.dtype,
                        adapter_config_json=new.adapter_config_json,
                        request_id=new.request_id or None,
                        create_time=utcnow(),
                    )
                    session.add(version)
                    session.flush()
                    return self._versions(session, row, [version])[0]
            except AlreadyExists as exc:
                if exc.__cause__ is None:  # raised by us, not by a constraint: final
                    raise
                last = exc
        raise Unavailable(f"could not allocate a version number for {adapter!r}", detail=last.detail if last else "")

    def get_version(self, adapter: str, version: int) -> AdapterVersion:
        with self.session_scope() as session:
            row = self._adapter_row(session, adapter)
            found = session.scalar(
                select(VersionRow).where(VersionRow.adapter_id == row.id, VersionRow.version == version)
            )
            if found is None:
                raise version_not_found(f"adapter {adapter!r} has no version {version}")
            return self._versions(session, row, [found])[0]

    def list_versions(self, adapter: str, before: int | None, limit: int) -> list[AdapterVersion]:
        with self.session_scope() as session:
            row = self._adapter_row(session, adapter)
            query = (
                select(VersionRow)
                .where(VersionRow.adapter_id == row.id)
                .order_by(VersionRow.version.desc())
                .limit(limit)
            )
            if before is not None:
                query = query.where(VersionRow.version < before)
            return self._versions(session, row, list(session.scalars(query)))

    def delete_version(self, adapter: str, version: int) -> None:
        with self.session_scope(write=True) as session:
            row = self._adapter_row(session, adapter)
            found = session.scalar(
                select(VersionRow).where(VersionRow.adapter_id == row.id, VersionRow.version == version)
            )
            if found is None:
                raise version_not_found(f"adapter {adapter!r} has no version {version}")
            pinned = sorted(session.scalars(select(AliasRow.alias).where(AliasRow.version_id == found.id)))
            if pinned:
                raise FailedPrecondition(
                    f"version {version} of {adapter!r} is pointed to by alias(es) {', '.join(pinned)}; "
                    "move or delete them first",
                    reason="VERSION_HAS_ALIASES",
                )
            session.delete(found)

    # ---------------------------------------------------------------- aliases

    def set_alias(self, adapter: str, alias: str, version: int) -> Adapter:
        for attempt in range(2):
            try:
                with self.session_scope(write=True) as session:
                    row = self._adapter_row(session, adapter)
                    target = session.scalar(
                        select(VersionRow).where(VersionRow.adapter_id == row.id, VersionRow.version == version)
                    )
                    if target is None or target.state != READY:
                        raise version_not_found(f"adapter {adapter!r} has no ready version {version}")
                    current = session.get(AliasRow, (row.id, alias))
                    if current is None:
                        session.add(AliasRow(adapter_id=row.id, alias=alias, version_id=target.id))
                    else:
                        current.version_id = target.id
                    self._touch(row)
                    session.flush()
                    return self._adapters(session, [row])[0]
            except AlreadyExists as exc:
                if exc.__cause__ is None or attempt:
                    raise
        raise AssertionError("unreachable")

    def delete_alias(self, adapter: str, alias: str) -> Adapter:
        with self.session_scope(write=True) as session:
            row = self._adapter_row(session, adapter)
            current = session.get(AliasRow, (row.id, alias))
            if current is None:
                raise AliasNotFound(f"adapter {adapter!r} has no alias {alias!r}")
            session.delete(current)
            self._touch(row)
            session.flush()
            return self._adapters(session, [row])[0]

    # ---------------------------------------------------------------- resolve + gc support

    def resolve(self, ref: AdapterRef) -> AdapterVersion:
        """One indexed query for the version (joined with its adapter), one for its aliases."""
        with self.session_scope() as session:
            query = (
                select(VersionRow, AdapterRow)
                .join(AdapterRow, AdapterRow.id == VersionRow.adapter_id)
                .where(AdapterRow.name == ref.name, VersionRow.state == READY)
            )
            if ref.selector_kind == "latest":
                query = query.order_by(VersionRow.version.desc()).limit(1)
            elif ref.selector_kind == "version":
                query = query.where(VersionRow.version == ref.version)
            elif ref.selector_kind == "digest":
                query = query.where(VersionRow.digest == ref.value).order_by(VersionRow.version.desc()).limit(1)
            else:
                query = query.join(
                    AliasRow, (AliasRow.version_id == VersionRow.id) & (AliasRow.adapter_id == AdapterRow.id)
                ).where(AliasRow.alias == ref.value)
            found = session.execute(query).first()
            if found is None:
                self._adapter_row(session, ref.name)  # AdapterNotFound when the adapter itself is missing
                if ref.selector_kind == "alias":
                    raise AliasNotFound(f"adapter {ref.name!r} has no alias {ref.value!r}")
                what = {"latest": "no ready version", "version": f"no version {ref.value}"}.get(
                    ref.selector_kind, f"no version with digest {ref.value}"
                )
                raise version_not_found(f"adapter {ref.name!r} has {what}")
            version, adapter = found
            return self._versions(session, adapter, [version])[0]

    def referenced_blob_keys(self) -> set[str]:
        with self.session_scope() as session:
            return set(session.scalars(select(VersionRow.blob_key).distinct()))
