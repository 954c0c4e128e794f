"""``LLMEngine``: the async API over ``EngineCore``, with the step loop on its own thread.

Threading model: the step thread alone touches the core's mutable state (sequences, KV blocks, adapter
residency). API calls from the event loop enqueue commands (submit, abort, add/evict/pin adapters) and wake the
thread; a command that answers returns an ``asyncio.Future`` resolved from the thread. Results flow back per
request through an ``asyncio.Queue`` fed with ``loop.call_soon_threadsafe``. After every loop iteration the
thread publishes an immutable ``EngineStats`` and the set of host-resident adapter keys: ``stats()`` and
``has_adapter()`` read those without any lock, so no RPC or metrics scrape ever waits for a forward pass.
No I/O ever happens inside a step.

The step loop itself::

    while running:
        drain commands
        events = core.expire() + core.step()    # time limits first, then schedule → run → sample → postprocess
        deliver events to their streams; publish stats
        if nothing was scheduled: sleep until woken (or a short tick, for time limits)

Draining (SIGTERM): ``drain`` stops admission (new requests get UNAVAILABLE ``SHUTTING_DOWN``), waits up to its
deadline for the requests in flight, then ends the rest with the same typed error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from tokenizers import Tokenizer

from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.adapters.residency import AdapterInfo, ResidentView
from loraplex.engine.config import EngineConfig
from loraplex.engine.core import EngineCore
from loraplex.engine.request import Delta, GenerationRequest, merge_deltas
from loraplex.engine.scheduler import Event, Failure
from loraplex.engine.sequence import Sequence
from loraplex.engine.stats import EngineStats, empty_stats
from loraplex.registry.errors import AlreadyExists, QueueFull, Unavailable
from loraplex.registry.spec import ModelSpec

log = logging.getLogger(__name__)
_IDLE_TICK_S = 0.02
_STATS_PERIOD_S = 0.01
# While requests are decoding, one loop iteration runs at most about this much command work before the next step
# (the rest waits, in order, for the following iteration): a burst of adapter loads then delays running streams by
# a step's worth, not by the whole burst.
_DRAIN_BUDGET_S = 0.05
T = TypeVar("T")


@dataclass
class _Stream:
    """Where one request's events go: a queue owned by the event loop that submitted it."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Delta | BaseException]

    def push(self, item: Delta | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the loop already closed: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _put_all(items: list[tuple[_Stream, Delta | BaseException]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


def shutting_down() -> Unavailable:
    return Unavailable("the engine is shutting down; retry on another replica", reason="SHUTTING_DOWN")


class LLMEngine:
    def __init__(self, core: EngineCore) -> None:
        self._core = core
        self._commands: deque[Callable[[], list[Event]]] = deque()
        self._wake = threading.Event()
        self._streams_lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        self._stats = empty_stats()
        self._host_keys: frozenset[str] = frozenset()
        self._host_version = -1
        self._published_at = 0.0
        self._missing: Callable[[str], None] = lambda key: None
        core.on_adapter_missing = self._adapter_missing
        self._publish()

    @classmethod
    def load(cls, config: EngineConfig) -> LLMEngine:
        return cls(EngineCore.load(config))

    # ---- identity ------------------------------------------------------------------------------------------
    @property
    def core(self) -> EngineCore:
        return self._core

    @property
    def tokenizer(self) -> Tokenizer:
        return self._core.tokenizer

    @property
    def model_spec(self) -> ModelSpec:
        return self._core.loaded.spec

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._core.loaded.eos_token_ids

    @property
    def max_model_len(self) -> int:
        return self._core.max_model_len

    # ---- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine-step", daemon=True)
        self._thread.start()

    @property
    def draining(self) -> bool:
        return self._draining

    async def drain(self, timeout_s: float) -> int:
        """Stop admitting; wait up to ``timeout_s`` for requests in flight; end the rest (SHUTTING_DOWN).

        Returns how many requests had to be ended.
        """
        self._draining = True
        deadline = asyncio.get_running_loop().time() + max(0.0, timeout_s)
        while self.num_in_flight() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        with self._streams_lock:
            left = list(self._streams)
        for request_id in left:
            self._command(functools.partial(self._end_with, request_id, shutting_down()))
        return len(left)

    def _end_with(self, request_id: str, error: BaseException) -> list[Event]:
        self._core.abort(request_id)  # frees blocks and adapter; the CANCELLED delta is replaced by the error
        return [Failure(request_id, error)]

    def num_in_flight(self) -> int:
        with self._streams_lock:
            return len(self._streams)

    async def shutdown(self) -> None:
        """Stop the step thread; requests still in flight end with UNAVAILABLE ``SHUTTING_DOWN``."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._draining = True
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(thread.join)
        with self._streams_lock:
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.push(shutting_down())

    # ---- adapters (the residency lives on the step thread; these are commands) -------------------------------
    def on_adapter_missing(self, callback: Callable[[str], None]) -> None:
        """``callback(key)`` runs on the step thread when a request names a key not in the host tier."""
        self._missing = callback

    def _adapter_missing(self, key: str) -> None:
        self._missing(key)

    def add_adapter(
        self, key: str, adapter: HostAdapter, info: AdapterInfo | None = None
    ) -> asyncio.Future[list[str]]:
        """Put a parsed adapter in the host tier; requests waiting for ``key`` become schedulable.

        The future gives the keys evicted from the host tier to make room, or fails with the typed error (e.g.
        ``HOST_CACHE_FULL``), and then the requests waiting for ``key`` fail with it too.
        """

        def add() -> list[str]:
            try:
                return self._core.residency.add(key, adapter, info)
            except Exception as exc:
                self._commands.appendleft(functools.partial(self._core.fail_adapter, key, exc))
                raise

        return self._ask(add)

    def has_adapter(self, key: str) -> bool:
        """Host-resident as of the last published snapshot (lock-free)."""
        return key in self._host_keys

    def evict_adapter(self, key: str) -> asyncio.Future[bool]:
        """Drop ``key`` from every tier: False if absent; ``FailedPrecondition`` while requests use it."""
        return self._ask(lambda: self._core.residency.remove(key))

    def pin_adapter(self, key: str, pinned: bool) -> asyncio.Future[None]:
        return self._ask(lambda: self._core.residency.pin(key, pinned))

    def merge_adapter(self, key: str) -> asyncio.Future[None]:
        """Fold host-resident ``key`` into the base weights between steps (see ``EngineCore.merge_adapter``)."""
        return self._ask(lambda: self._core.merge_adapter(key))

    def unmerge_adapter(self) -> asyncio.Future[str | None]:
        """Restore the base weights; the future gives the key that was merged (None if none was)."""
        return self._ask(self._core.unmerge_adapter)

    def host_adapter(self, key: str) -> asyncio.Future[HostAdapter | None]:
        """The parsed adapter held under ``key`` (None if absent); adapters are immutable, so sharing is safe."""
        return self._ask(lambda: self._core.residency.get(key))

    def resident(self, key: str) -> asyncio.Future[ResidentView | None]:
        """A fresh view of one adapter, read on the step thread (for admin answers that must not be stale)."""
        return self._ask(lambda: self._core.residency.view(key))

    def fail_adapter(self, key: str, exc: BaseException) -> None:
        """The fetcher could not produce ``key``: fail every request waiting for it with ``exc``."""
        self._command(lambda: self._core.fail_adapter(key, exc))

    # ---- requests ------------------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Submit now (raises ``InvalidArgument``/``QueueFull``/``AlreadyExists`` at once); iterate for deltas.

        Closing the iterator or cancelling the task that awaits it aborts the request.
        """
        loop = asyncio.get_running_loop()
        with self._streams_lock:
            if self._stopping or self._draining:
                raise shutting_down()
            if request.request_id in self._streams:
                raise AlreadyExists(f"request {request.request_id!r} is already in flight")
            if len(self._streams) >= self._core.config.max_queue:
                raise QueueFull(f"engine queue is full ({self._core.config.max_queue} requests in flight)")
            seq = self._core.prepare(request)
            stream = _Stream(loop, asyncio.Queue())
            self._streams[request.request_id] = stream
        self._command(lambda: self._add(seq))
        return self._relay(request.request_id, stream)

    def _add(self, seq: Sequence) -> list[Event]:
        self._core.add(seq)
        return []

    async def _relay(self, request_id: str, stream: _Stream) -> AsyncIterator[Delta]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                while isinstance(item, Delta) and item.finish_reason is None and not stream.queue.empty():
                    # The consumer fell behind: deltas already here go out as one (one message or SSE event
                    # instead of several), which costs no latency and saves the door per-message work.
                    following = stream.queue.get_nowait()
                    if isinstance(following, BaseException):
                        yield item
                        item = following
                        break
                    item = merge_deltas(item, following)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """End a request (idempotent); its stream gets a final CANCELLED delta, its blocks and adapter are freed."""
        self._command(lambda: self._core.abort(request_id))

    def stats(self) -> EngineStats:
        """The snapshot published after the last step (lock-free; never waits for a forward pass)."""
        return self._stats

    # ---- the step thread -----------------------------------------------------------------------------------
    def _command(self, fn: Callable[[], list[Event]]) -> None:
        self._commands.append(fn)
        self._wake.set()

    def _ask(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn`` on the step thread; its result or exception comes back through the returned future."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(outcome: Callable[[], None]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop already closed: nobody is waiting
                loop.call_soon_threadsafe(outcome)

        def run() -> list[Event]:
            try:
                result = fn()
                self._publish()  # an answered command's effect is visible to has_adapter() and stats() at once
            except Exception as exc:
                settle(functools.partial(_settle, future, None, exc))
            else:
                settle(functools.partial(_settle, future, result, None))
            return []

        self._command(run)
        return future

    def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            events = self._drain()
            events.extend(self._core.expire())
            scheduled = self._step(events)
            self._publish(force=not scheduled)  # before delivering: a client that saw its delta sees the step too
            self._deliver(events)
            if not scheduled and not self._commands:
                self._wake.wait(_IDLE_TICK_S if self._core.has_work() else None)

    def _publish(self, force: bool = True) -> None:
        """Replace the published snapshots (a reference swap: readers on other threads never see a torn one).

        The host-key set follows every change; the full stats at most every ``_STATS_PERIOD_S`` while busy (and
        at once when idle), so a fast GPU step does not pay for a snapshot each time.
        """
        self._publish_host_keys()
        now = time.monotonic()
        if force or now - self._published_at >= _STATS_PERIOD_S:
            self._stats = dataclasses.replace(self._core.stats(), created=time.time())
            self._published_at = now

    def _publish_host_keys(self) -> None:
        residency = self._core.residency
        if residency.host_version != self._host_version:
            self._host_keys, self._host_version = residency.keys(), residency.host_version

    def _drain(self) -> list[Event]:
        events: list[Event] = []
        deadline = time.monotonic() + _DRAIN_BUDGET_S if self._core.scheduler.running else math.inf
        while self._commands and time.monotonic() < deadline:
            try:
                events.extend(self._commands.popleft()())
            except Exception:  # one bad command must not stop the step thread
                log.exception("engine command failed")
        return events

    def _step(self, events: list[Event]) -> bool:
        """One core step, appending its events; a failing step fails its requests instead of the thread."""
        if not self._core.has_work():
            return False
        try:
            step_events = self._core.step()
        except Exception:  # a bug or device error must not strand every waiting client
            log.exception("engine step failed")
            error = Unavailable("engine step failed; retry the request", reason="STEP_FAILED")
            for seq in [*self._core.scheduler.running]:
                self._core.abort(seq.request_id)  # frees its blocks and adapter; the client gets the error
                events.append(Failure(seq.request_id, error))
            return True
        events.extend(step_events)
        return bool(step_events) or bool(self._core.scheduler.running)

    def _deliver(self, events: list[Event]) -> None:
        """Hand a step's events to their streams: one wake-up per event loop per step, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Delta | BaseException]]] = {}
        with self._streams_lock:
            for event in events:
                stream = self._streams.get(event.request_id)
                if isinstance(event, Failure) or event.finish_reason is not None:
                    self._streams.pop(event.request_id, None)
                if stream is not None:
                    item = event.error if isinstance(event, Failure) else event
                    by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop already closed: nobody is listening
                loop.call_soon_threadsafe(_put_all, items)
