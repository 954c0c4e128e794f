"""Adapters on demand: resolve a registry reference, fetch its weights once, verify them, hand them to the engine.

The miss path is ``resolve → (local disk tier, if configured) or download → sha256 + digest verified →
HostAdapter parsed and validated against this engine's model (off the event loop) → LLMEngine.add_adapter``.
Where adapters live afterwards (host tier, device pool, LRU, pins, budgets) is the engine's
``AdapterResidency``; this object only does network and disk I/O, so it lives in services/, not in the engine.

- Identity is the version digest. Mutable selectors (``ns/name``, ``@alias``) are cached for ``alias_ttl_s`` and
  then resolved again, so a re-pointed alias reaches new requests within the TTL and never serves stale weights;
  ``@3`` and ``@sha256:…`` are immutable and cached for good. Resolutions are cached per caller token, so the
  registry's tenancy rules apply to every caller even when the weights are already here.
- Single flight: concurrent requests for one cold digest share one download task. When the engine reports a
  request whose adapter is not host-resident (``adapter_missing``), the fetch starts from there too, so a race
  with an eviction can never leave a request waiting for nothing.
- Registry down: a reference this caller resolved before keeps serving; an immutable reference (``@N`` or
  ``@sha256:``) to a version this caller already resolved under another reference of the same adapter resolves
  offline too; anything else is UNAVAILABLE.
- Failure classes: the registry or network failing is UNAVAILABLE (retrying may help); bytes that verified but
  cannot be loaded by this engine are FAILED_PRECONDITION ``ADAPTER_INCOMPATIBLE`` (retrying never helps).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from loraplex.engine.adapters.disk_cache import DiskTier
from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.adapters.residency import AdapterInfo
from loraplex.engine.engine import LLMEngine
from loraplex.registry.client import RegistryClient
from loraplex.registry.digest import version_digest
from loraplex.registry.errors import AdapterIncompatible, LoraplexError, Unavailable
from loraplex.registry.refs import AdapterRef, parse_ref

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
class FetchStats:
    """Counters tests and the metrics endpoint read."""

    downloads: int = 0
    download_failures: int = 0
    resolve_hits: int = 0
    resolve_misses: int = 0
    host_hits: int = 0
    host_misses: int = 0
    load_seconds: list[float] = field(default_factory=list)


class FetchObserver(Protocol):
    """Where counters go (the service's Prometheus metrics)."""

    def on_event(self, tier: str, event: str) -> None: ...

    def on_load(self, tier: str, seconds: float) -> None: ...


def _token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AdapterFetcher:
    def __init__(
        self,
        engine: LLMEngine,
        client: RegistryClient,
        *,
        base_model: str | None,
        max_rank: int,
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
        self._ttl = alias_ttl_s
        self._clock = clock
        self._observer = observer
        self._disk = disk
        self._pin_memory = pin_memory  # on CUDA: page-locked host copies make host→device loads async and fast
        self._resolved: dict[tuple[str, str], tuple[ResolvedAdapter, float]] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._fetch_token: dict[str, str] = {}  # digest -> a token that resolved it (for engine-driven fetches)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sources: list[Callable[[str], bool]] = []  # other producers of keys (adapter mixes)
        self.stats = FetchStats()
        engine.on_adapter_missing(self._adapter_missing)

    def _event(self, tier: str, event: str) -> None:
        if self._observer is not None:
            self._observer.on_event(tier, event)

    # -- resolution ----------------------------------------------------------------------------------------
    async def resolve(self, ref: str, token: str = "") -> ResolvedAdapter:
        parsed = parse_ref(ref)  # InvalidArgument for a malformed reference, before any network
        self._loop = asyncio.get_running_loop()
        key = (str(parsed), _token_key(token))
        cached = self._resolved.get(key)
        now = self._clock()
        if cached is not None and cached[1] > now:
            self.stats.resolve_hits += 1
            return cached[0]
        self.stats.resolve_misses += 1
        try:
            version = await self._client.resolve(str(parsed), token=token or None)
        except Unavailable:
            offline = cached[0] if cached is not None else self._offline(parsed, key[1])
            if offline is None:
                raise
            log.warning("registry unavailable; serving %s from cache", ref)
            return dataclasses.replace(offline, ref=ref)
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
        self._fetch_token[resolved.digest] = token
        return resolved

    def _offline(self, parsed: AdapterRef, token_key: str) -> ResolvedAdapter | None:
        """An immutable reference this caller already resolved under another name of the same adapter."""
        if parsed.selector_kind not in ("version", "digest"):
            return None
        for (_, holder), (known, _) in self._resolved.items():
            if holder != token_key or known.adapter != parsed.name:
                continue
            if (parsed.selector_kind == "version" and known.version == parsed.version) or known.digest == parsed.value:
                return known
        return None

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

    def known(self, digest: str) -> ResolvedAdapter | None:
        """Any resolution of ``digest`` seen (to name it in listings)."""
        for resolved, _ in self._resolved.values():
            if resolved.digest == digest:
                return resolved
        return None

    # -- fetching ------------------------------------------------------------------------------------------
    def ensure(self, resolved: ResolvedAdapter, token: str = "") -> asyncio.Task[None] | None:
        """Make ``resolved`` host-resident: None when it already is, else the (shared) fetch task."""
        if self._engine.has_adapter(resolved.digest):
            self.stats.host_hits += 1
            self._event("host", "hit")
            return None
        task = self._inflight.get(resolved.digest)
        if task is None or task.done():  # a finished task already failed its waiters: start afresh
            self.stats.host_misses += 1
            self._event("host", "miss")
            task = asyncio.create_task(self._fetch(resolved, token), name=f"fetch {resolved.digest[:19]}")
            self._inflight[resolved.digest] = task
            task.add_done_callback(functools.partial(self._forget, resolved.digest))
        return task

    def _forget(self, digest: str, task: asyncio.Task[None]) -> None:
        self._inflight.pop(digest, None)
        if not task.cancelled():
            task.exception()  # the failure reached the waiting requests through the engine; don't log it twice

    def _adapter_missing(self, digest: str) -> None:
        """Step thread: a request names a key the host tier lacks; start (or join) its fetch on the loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._refetch, digest)

    def add_source(self, rebuild: Callable[[str], bool]) -> None:
        """Another producer of engine keys: ``rebuild(key)`` starts it and returns True when it owns ``key``."""
        self._sources.append(rebuild)

    def _refetch(self, digest: str) -> None:
        if any(rebuild(digest) for rebuild in self._sources):
            return
        resolved = self.known(digest)
        if resolved is None:
            self._engine.fail_adapter(digest, Unavailable(f"adapter {digest} is not resolvable here any more"))
            return
        self.ensure(resolved, self._fetch_token.get(digest, ""))

    async def _load_bytes(self, resolved: ResolvedAdapter, token: str) -> tuple[str, bytes, str]:
        """(config, weights, tier) from the disk tier when it holds a verified copy, else from the registry."""
        if self._disk is not None:
            cached = await asyncio.to_thread(self._disk.get, resolved.digest)  # verified: a damaged entry is a miss
            if cached is not None:
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

    async def _parse(self, resolved: ResolvedAdapter, config: str, weights: bytes) -> HostAdapter:
        """Verified bytes this engine cannot load are a permanent, typed failure (never UNAVAILABLE)."""
        spec = self._engine.model_spec
        try:
            adapter = await asyncio.to_thread(HostAdapter.from_bytes, config, weights, spec, self._max_rank)
        except LoraplexError as exc:
            raise AdapterIncompatible(
                f"{resolved.adapter}@{resolved.version} cannot be loaded by this engine: {exc.message}",
                metadata={"adapter": resolved.adapter},
            ) from exc
        except Exception as exc:  # e.g. the safetensors library refusing a file the registry accepted
            log.exception("parsing adapter %s failed", resolved.digest)
            raise AdapterIncompatible(
                f"{resolved.adapter}@{resolved.version} cannot be loaded by this engine: {exc}",
                metadata={"adapter": resolved.adapter},
            ) from exc
        if self._pin_memory:
            adapter = await asyncio.to_thread(pin_host_adapter, adapter)
        return adapter

    async def _fetch(self, resolved: ResolvedAdapter, token: str) -> None:
        started = self._clock()
        try:
            config, weights, tier = await self._load_bytes(resolved, token)
            adapter = await self._parse(resolved, config, weights)
            info = AdapterInfo(resolved.adapter, resolved.version, resolved.rank)
            evicted = await self._engine.add_adapter(resolved.digest, adapter, info)  # a failure fails waiters too
            for _ in evicted:
                self._event("host", "eviction")
            elapsed = self._clock() - started
            self.stats.load_seconds.append(elapsed)
            if self._observer is not None:
                self._observer.on_load(tier, elapsed)
        except LoraplexError as exc:
            self.stats.download_failures += 1
            self._engine.fail_adapter(resolved.digest, exc)
            raise
        except Exception as exc:
            self.stats.download_failures += 1
            log.exception("fetching adapter %s failed", resolved.digest)
            error = Unavailable("fetching the adapter failed; retry the request", reason="FETCH_FAILED")
            self._engine.fail_adapter(resolved.digest, error)
            raise error from exc

    # -- admin ---------------------------------------------------------------------------------------------
    def disk_bytes(self) -> int:
        return self._disk.used_bytes() if self._disk is not None else 0

    async def evict(self, digest: str) -> bool:
        """Drop an adapter from every tier (``FailedPrecondition`` while requests use it)."""
        removed = await self._engine.evict_adapter(digest)
        if self._disk is not None:
            await asyncio.to_thread(self._disk.remove, digest)
        for key in [k for k, (r, _) in self._resolved.items() if r.digest == digest]:
            del self._resolved[key]
        return removed


def _digest_of(config_json: str, weights: bytes) -> str:
    return version_digest(config_json, hashlib.sha256(weights).hexdigest())


def pin_host_adapter(adapter: HostAdapter) -> HostAdapter:
    """The same adapter with every tensor in page-locked host memory (only meaningful with CUDA present)."""
    modules = {
        key: dataclasses.replace(m, a=m.a.pin_memory(), b=m.b.pin_memory()) for key, m in adapter.modules.items()
    }
    return dataclasses.replace(adapter, modules=modules)
