"""Per-request adapter mixes: resolve the members with the caller's token, build the mix once, hand it over.

Why in services/: building a mix needs the members fetched (network) and, for TIES/DARE, an SVD per module that
takes seconds to minutes — none of it may run on the event loop or in a step. The result is an ordinary adapter
for the engine: its ``HostAdapter`` goes into the host tier under the *mix digest* (members' version digests,
weights, method, density), so every later request for the same mix — from any caller who may read all its
members — runs it straight from the caches, and the batch treats it like any other adapter.

The math lives in ``engine/adapters/mix.py`` (equal to PEFT's ``add_weighted_adapter``). CAT is exact and costs
no more than copying the members' rank-rows (rank Σrᵢ, bounded by the engine's max LoRA rank); LINEAR keeps the
members' rank; TIES / DARE become rank max(rᵢ) after an SVD.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.adapters.mix import MAX_MIX_MEMBERS, Mix, MixMember, MixMethod, mix_digest, mix_modules
from loraplex.engine.adapters.residency import AdapterInfo
from loraplex.engine.engine import LLMEngine
from loraplex.registry.errors import AdapterIncompatible, InvalidArgument, LoraplexError, Unavailable
from loraplex.services.fetcher import AdapterFetcher, ResolvedAdapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MixRequest:
    """A mix as a client asks for it: member references with weights, a method, an optional density."""

    members: tuple[tuple[str, float], ...]
    method: MixMethod = MixMethod.CAT
    density: float | None = None

    def check(self) -> None:
        """Shape checks that need no registry (the rest is ``Mix``'s validation once members are known)."""
        if not 1 <= len(self.members) <= MAX_MIX_MEMBERS:
            raise InvalidArgument(
                f"a mix needs 1 to {MAX_MIX_MEMBERS} adapters, got {len(self.members)}", metadata={"field": "mix"}
            )
        if any(not ref for ref, _ in self.members):
            raise InvalidArgument("every mix member needs an adapter reference", metadata={"field": "mix"})


@dataclass(frozen=True)
class PlannedMix:
    """A resolved mix: its digest (the engine's key), a display name, and its members as resolved."""

    digest: str
    name: str
    request: MixRequest
    members: tuple[ResolvedAdapter, ...]
    token: str


class MixBuilder:
    """Single-flight builds of mixes, keyed by mix digest; rebuilds on demand after an eviction."""

    def __init__(self, engine: LLMEngine, fetcher: AdapterFetcher, max_rank: int) -> None:
        self._engine = engine
        self._fetcher = fetcher
        self._max_rank = max_rank
        self._known: dict[str, PlannedMix] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        fetcher.add_source(self._rebuild)

    async def plan(self, request: MixRequest, token: str) -> PlannedMix:
        """Resolve every member with the caller's token (tenancy) and name the mix; starts nothing."""
        request.check()
        members = tuple([await self._fetcher.resolve(ref, token) for ref, _ in request.members])
        weights = [w for _, w in request.members]
        digest = mix_digest([m.digest for m in members], weights, request.method, request.density)
        name = "+".join(ref for ref, _ in request.members)
        planned = PlannedMix(digest, name, request, members, token)
        self._known[digest] = planned
        return planned

    def ensure(self, planned: PlannedMix) -> asyncio.Task[None] | None:
        """Make the mix host-resident: None when it already is, else the (shared) build task."""
        if self._engine.has_adapter(planned.digest):
            return None
        task = self._inflight.get(planned.digest)
        if task is None or task.done():
            task = asyncio.create_task(self._build(planned), name=f"mix {planned.digest[:19]}")
            self._inflight[planned.digest] = task
            task.add_done_callback(functools.partial(self._forget, planned.digest))
        return task

    def _forget(self, digest: str, task: asyncio.Task[None]) -> None:
        self._inflight.pop(digest, None)
        if not task.cancelled():
            task.exception()  # reported to the waiting requests through the engine

    def _rebuild(self, digest: str) -> bool:
        """The engine met a request for ``digest`` that is not host-resident: rebuild it if it is a known mix."""
        planned = self._known.get(digest)
        if planned is None:
            return False
        self.ensure(planned)
        return True

    async def _build(self, planned: PlannedMix) -> None:
        try:
            adapters = await self._members(planned)
            mix = Mix(
                members=tuple(
                    MixMember(r.digest, r.base_model, a.modules, dora=a.dora)
                    for r, a in zip(planned.members, adapters, strict=True)
                ),
                weights=tuple(w for _, w in planned.request.members),
                method=planned.request.method,
                density=planned.request.density,
            )
            modules = await asyncio.to_thread(mix_modules, mix)
            rank = max(m.rank for m in modules.values())
            if rank > self._max_rank:
                raise AdapterIncompatible(
                    f"the mix {planned.name} has rank {rank} (CAT adds its members' ranks), over this engine's max "
                    f"rank {self._max_rank}",
                    metadata={"rank": str(rank)},
                )
            adapter = HostAdapter(modules=modules, rank=rank)
            info = AdapterInfo(adapter=planned.name, version=0, rank=rank)
            await self._engine.add_adapter(planned.digest, adapter, info)
        except LoraplexError as exc:
            self._engine.fail_adapter(planned.digest, exc)
            raise
        except Exception as exc:
            log.exception("building mix %s failed", planned.digest)
            error = Unavailable("building the adapter mix failed; retry the request", reason="FETCH_FAILED")
            self._engine.fail_adapter(planned.digest, error)
            raise error from exc

    async def _members(self, planned: PlannedMix) -> list[HostAdapter]:
        """Every member's parsed adapter, fetched if needed (a member evicted meanwhile is fetched again once)."""
        for attempt in range(2):
            tasks = [self._fetcher.ensure(m, planned.token) for m in planned.members]
            await asyncio.gather(*(t for t in tasks if t is not None))
            found = [await self._engine.host_adapter(m.digest) for m in planned.members]
            if all(a is not None for a in found):
                return [a for a in found if a is not None]
            log.info("a member of mix %s left the host tier; fetching again (attempt %d)", planned.digest, attempt)
        raise Unavailable(f"the members of mix {planned.name} could not be held together; retry", reason="FETCH_FAILED")
