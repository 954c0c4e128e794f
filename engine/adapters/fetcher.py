"""Adapters on demand: resolve a registry reference, fetch its weights once, verify, validate, cache on the host.

The miss path is ``resolve → (local disk tier, if configured) or download → sha256 + digest verified →
HostAdapter (validated against this engine's model) → host tier (page-locked on CUDA)``; the device tier is
filled by the scheduler when a batch needs the adapter. Why here and not in the scheduler: all I/O stays on the
event loop, never inside a step.

- Identity is the version digest. Mutable selectors (``ns/name``, ``@alias``) are cached for ``alias_ttl_s`` and
  then resolved again, so a re-pointed alias reaches new requests within the TTL and never serves stale weights;
  ``@3`` and ``@sha256:…`` are immutable and cached until evicted. Resolutions are cached per caller token, so
  the registry's tenancy rules apply to every caller even when the weights are already here.
- Single flight: concurrent requests for one cold digest share one download task.
- While the registry is unreachable, a reference resolved before keeps serving from cache; anything else gets
  UNAVAILABLE.
- The host tier has a byte budget with LRU eviction; adapters used by live requests, and pinned ones, stay.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from loraplex.engine.adapters.disk_cache import DiskTier
from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.engine import LLMEngine
from loraplex.registry.client import RegistryClient
from loraplex.registry.digest import version_digest
from loraplex.registry.errors import (
    AdapterIncompatible,
    FailedPrecondition,
    LoraplexError,
    ResourceExhausted,
    Unavailable,
)
from loraplex.registry.refs import parse_ref

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedAdapter:
    ref: str
    adapter: str
    version: int
    digest: str
    weights_sha256: str
    size_bytes: int
    rank: int
    base_model: str


@dataclass
class HostEntry:
    resolved: ResolvedAdapter
    nbytes: int
    last_used: float
    pinned: bool = False


@dataclass
class FetchStats:
    """Counters the metrics endpoint and tests read."""

    downloads: int = 0
    download_failures: int = 0
    resolve_hits: int = 0
    resolve_misses: int = 0
    host_hits: int = 0
    host_misses: int = 0
    host_evictions: int = 0
    load_seconds: list[float] = field(default_factory=list)


class FetchObserver(Protocol):
    """Where counters go (the service's Prometheus metrics); the engine layer knows no metrics library."""

    def on_event(self, tier: str, event: str) -> None: ...

    def on_load(self, tier: str, seconds: float) -> None: ...


class AdapterFetcher:
    def __init__(
        self,
        engine: LLMEngine,
        client: RegistryClient,
        *,
        base_model: str | None,
        max_rank: int,
        host_budget_bytes: int,
        alias_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        observer: FetchObserver | None = None,
        disk: DiskTier | None = None,
        pin_memory: bool = False,
    ) -> None:
        self._engine = engine
        self._client = client
        self._base_model = base_model
        self._max_rank = max_rank
        self._budget = host_budget_bytes
        self._ttl = alias_ttl_s
        self._clock = clock
        self._observer = observer
        self._disk = disk
        self._pin_memory = pin_memory  # on CUDA: page-locked host copies make host→device loads async and fast
        self._resolved: dict[tuple[str, str], tuple[ResolvedAdapter, float]] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._host: OrderedDict[str, HostEntry] = OrderedDict()  # LRU order: oldest first
        self.stats = FetchStats()

    def _event(self, tier: str, event: str) -> None:
        if self._observer is not None:
            self._observer.on_event(tier, event)

    # -- resolution ----------------------------------------------------------------------------------------
    async def resolve(self, ref: str, token: str = "") -> ResolvedAdapter:
        parsed = parse_ref(ref)  # InvalidArgument for a malformed reference, before any network
        key = (str(parsed), hashlib.sha256(token.encode()).hexdigest())
        cached = self._resolved.get(key)
        now = self._clock()
        if cached is not None and cached[1] > now:
            self.stats.resolve_hits += 1
            return cached[0]
        self.stats.resolve_misses += 1
        try:
            version = await self._client.resolve(str(parsed), token=token or None)
        except Unavailable:
            if cached is not None:  # the registry is down: keep serving what this caller resolved before
                log.warning("registry unavailable; serving %s from cache", ref)
                return cached[0]
            raise
        resolved = ResolvedAdapter(
            ref=ref,
            adapter=version.adapter,
            version=version.version,
            digest=version.digest,
            weights_sha256=version.weights_sha256,
            size_bytes=version.size_bytes,
            rank=max([version.rank, *version.module_ranks.values()]),
            base_model=version.base_model,
        )
        self._check_compatible(resolved)
        immutable = parsed.selector_kind in ("version", "digest")
        self._resolved[key] = (resolved, float("inf") if immutable else now + self._ttl)
        return resolved

    def _check_compatible(self, resolved: ResolvedAdapter) -> None:
        if self._base_model and resolved.base_model != self._base_model:
            raise AdapterIncompatible(
                f"{resolved.adapter}@{resolved.version} is for base model {resolved.base_model!r}; "
                f"this engine serves {self._base_model!r}",
                metadata={"adapter": resolved.adapter, "base_model": resolved.base_model},
            )
        if resolved.rank > self._max_rank:
            raise AdapterIncompatible(
                f"{resolved.adapter}@{resolved.version} has rank {resolved.rank}, over this engine's max rank "
                f"{self._max_rank}",
                metadata={"adapter": resolved.adapter, "rank": str(resolved.rank)},
            )

    # -- host residency ------------------------------------------------------------------------------------
    def ensure(self, resolved: ResolvedAdapter, token: str = "") -> asyncio.Task[None] | None:
        """Make ``resolved`` host-resident: None when it already is, else the (shared) fetch task."""
        entry = self._host.get(resolved.digest)
        if entry is not None and self._engine.has_adapter(resolved.digest):
            self.stats.host_hits += 1
            self._event("host", "hit")
            entry.last_used = self._clock()
            self._host.move_to_end(resolved.digest)
            return None
        task = self._inflight.get(resolved.digest)
        if task is None or task.done():  # a finished task already failed its waiters: start afresh
            self.stats.host_misses += 1
            self._event("host", "miss")
            task = asyncio.create_task(self._fetch(resolved, token), name=f"fetch {resolved.digest[:19]}")
            self._inflight[resolved.digest] = task
            task.add_done_callback(functools.partial(self._forget, resolved.digest))
        return task

    def _forget(self, digest: str, _task: asyncio.Task[None]) -> None:
        self._inflight.pop(digest, None)

    async def _load_bytes(self, resolved: ResolvedAdapter, token: str) -> tuple[str, bytes, str]:
        """(config, weights, tier) from the disk tier when it holds a verified copy, else from the registry."""
        if self._disk is not None:
            cached = await asyncio.to_thread(self._disk.get, resolved.digest)
            if cached is not None and _digest_of(*cached) == resolved.digest:
                self._event("disk", "hit")
                return cached[0], cached[1], "disk"
            self._event("disk", "miss")
        downloaded = await self._client.download(f"{resolved.adapter}@{resolved.digest}", token=token or None)
        self.stats.downloads += 1
        self._event("registry", "download")
        config = downloaded.version.adapter_config_json
        if _digest_of(config, downloaded.weights) != resolved.digest:
            raise Unavailable(
                f"downloaded {resolved.adapter}@{resolved.version} does not match digest {resolved.digest}",
                reason="DOWNLOAD_CORRUPT",
            )
        if self._disk is not None:
            await asyncio.to_thread(self._disk.put, resolved.digest, config, downloaded.weights)
        return config, downloaded.weights, "registry"

    async def _fetch(self, resolved: ResolvedAdapter, token: str) -> None:
        started = self._clock()
        try:
            config, weights, tier = await self._load_bytes(resolved, token)
            spec = self._engine.model_spec
            adapter = await asyncio.to_thread(HostAdapter.from_bytes, config, weights, spec, self._max_rank)
            if self._pin_memory:
                adapter = await asyncio.to_thread(pin_host_adapter, adapter)
            self._make_room(adapter.nbytes, resolved.digest)
            self._engine.add_adapter(resolved.digest, adapter)
            self._host[resolved.digest] = HostEntry(resolved, adapter.nbytes, self._clock())
            elapsed = self._clock() - started
            self.stats.load_seconds.append(elapsed)
            if self._observer is not None:
                self._observer.on_load(tier, elapsed)
        except LoraplexError as exc:
            self.stats.download_failures += 1
            self._engine.fail_adapter(resolved.digest, _incompatible_if_invalid(exc))
            raise
        except Exception as exc:
            self.stats.download_failures += 1
            log.exception("loading adapter %s failed", resolved.digest)
            self._engine.fail_adapter(resolved.digest, Unavailable(f"loading adapter failed: {exc}"))
            raise

    def _drop_host(self, digest: str) -> None:
        """Remove ``digest`` from the engine's host tier and this LRU (``FailedPrecondition`` while in use)."""
        self._engine.remove_adapter(digest)
        del self._host[digest]
        self.stats.host_evictions += 1
        self._event("host", "eviction")

    def _make_room(self, needed: int, incoming: str) -> None:
        """Evict least-recently-used, unpinned, unused host adapters until ``needed`` bytes fit."""
        used = sum(e.nbytes for e in self._host.values())
        for digest in list(self._host):
            if used + needed <= self._budget:
                break
            entry = self._host[digest]
            if entry.pinned or digest == incoming:
                continue
            try:
                self._drop_host(digest)
            except FailedPrecondition:
                continue  # in use by a live request
            used -= entry.nbytes
        if used + needed > self._budget:
            raise ResourceExhausted(
                f"host adapter cache is full ({used} of {self._budget} bytes held by pinned or busy adapters)",
                reason="HOST_CACHE_FULL",
            )

    # -- admin ---------------------------------------------------------------------------------------------
    def disk_bytes(self) -> int:
        return self._disk.used_bytes() if self._disk is not None else 0

    def entries(self) -> list[HostEntry]:
        return list(self._host.values())

    def entry(self, digest: str) -> HostEntry | None:
        return self._host.get(digest)

    def pin(self, digest: str, pinned: bool) -> HostEntry:
        entry = self._host.get(digest)
        if entry is None:
            raise FailedPrecondition(f"adapter {digest} is not resident; prefetch it first", reason="NOT_RESIDENT")
        entry.pinned = pinned
        return entry

    def evict(self, digest: str) -> bool:
        """Drop an adapter from every tier (``FailedPrecondition`` while requests use it)."""
        if digest not in self._host:
            return False
        self._drop_host(digest)
        if self._disk is not None:
            self._disk.remove(digest)
        for key in [k for k, (r, _) in self._resolved.items() if r.digest == digest]:
            del self._resolved[key]
        return True


def _digest_of(config_json: str, weights: bytes) -> str:
    return version_digest(config_json, hashlib.sha256(weights).hexdigest())


def pin_host_adapter(adapter: HostAdapter) -> HostAdapter:
    """The same adapter with every tensor in page-locked host memory (only meaningful with CUDA present)."""
    modules = {
        key: dataclasses.replace(m, a=m.a.pin_memory(), b=m.b.pin_memory()) for key, m in adapter.modules.items()
    }
    return dataclasses.replace(adapter, modules=modules)


def _incompatible_if_invalid(exc: LoraplexError) -> LoraplexError:
    """An adapter the registry accepted but this engine cannot hold is a precondition failure, not bad input."""
    if exc.code == "INVALID_ARGUMENT":
        return AdapterIncompatible(exc.message, metadata=exc.metadata)
    return exc
