"""``LLMEngine``: the async API over ``EngineCore``, with the step loop on its own thread.

Threading model: the step thread alone touches the core's mutable state. API calls from the event loop
enqueue commands (submit, abort, fail, evict) and wake the thread; results flow back per request through an
``asyncio.Queue`` fed with ``loop.call_soon_threadsafe``. ``stats()`` takes the core lock, which the step
thread holds only while processing commands or running a step. No I/O ever happens inside a step.

The step loop itself::

    while running:
        drain commands
        events = core.step()            # schedule → run → sample → postprocess
        deliver events to their streams
        if nothing was scheduled: sleep until woken (or a short tick, for time limits)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from tokenizers import Tokenizer

from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.config import EngineConfig
from loraplex.engine.core import EngineCore
from loraplex.engine.request import Delta, GenerationRequest
from loraplex.engine.scheduler import Event, Failure
from loraplex.engine.sequence import Sequence
from loraplex.engine.stats import EngineStats
from loraplex.registry.errors import AlreadyExists, QueueFull, Unavailable
from loraplex.registry.spec import ModelSpec

log = logging.getLogger(__name__)
_IDLE_TICK_S = 0.02


@dataclass
class _Stream:
    """Where one request's events go: a queue owned by the event loop that submitted it."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Delta | BaseException]

    def push(self, item: Delta | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the loop already closed: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class LLMEngine:
    def __init__(self, core: EngineCore) -> None:
        self._core = core
        self._lock = threading.Lock()  # guards the core against stats() while the step thread works
        self._commands: deque[Callable[[], list[Event]]] = deque()
        self._wake = threading.Event()
        self._streams_lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False

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

    async def shutdown(self) -> None:
        """Stop the step thread; requests still in flight end with ``Unavailable``."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(thread.join)
        with self._streams_lock:
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.push(Unavailable("engine is shutting down"))

    # ---- adapters ------------------------------------------------------------------------------------------
    def add_adapter(self, key: str, adapter: HostAdapter) -> None:
        """Put a parsed adapter in the host tier; requests waiting for ``key`` become schedulable."""
        self._core.pool.check_compatible(adapter)
        self._core.host.add(key, adapter)
        self._wake.set()

    def has_adapter(self, key: str) -> bool:
        return self._core.host.has(key)

    def remove_adapter(self, key: str) -> None:
        """Drop ``key`` from the host tier (and the device pool); ``FailedPrecondition`` while requests use it."""
        self._core.host.remove(key)
        self._command(lambda: self._evict(key))

    def _evict(self, key: str) -> list[Event]:
        if not self._core.host.has(key):
            self._core.evict_adapter(key)
        return []

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
            if self._stopping:
                raise Unavailable("engine is shutting down")
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
        with self._lock:
            return self._core.stats()

    # ---- the step thread -----------------------------------------------------------------------------------
    def _command(self, fn: Callable[[], list[Event]]) -> None:
        self._commands.append(fn)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            with self._lock:
                events = self._drain()
                scheduled = self._step(events)
            self._deliver(events)
            if not scheduled:
                self._wake.wait(_IDLE_TICK_S if self._core.has_work() else None)

    def _drain(self) -> list[Event]:
        events: list[Event] = []
        while self._commands:
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
        except Exception as exc:  # a bug or device error must not strand every waiting client
            log.exception("engine step failed")
            error = Unavailable(f"engine step failed: {exc}")
            for seq in [*self._core.scheduler.running]:
                self._core.abort(seq.request_id)  # frees its blocks and adapter; the client gets the error
                events.append(Failure(seq.request_id, error))
            return True
        events.extend(step_events)
        return bool(step_events) or bool(self._core.scheduler.running)

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            with self._streams_lock:
                stream = self._streams.get(event.request_id)
                ended = isinstance(event, Failure) or event.finish_reason is not None
                if ended:
                    self._streams.pop(event.request_id, None)
            if stream is None:
                continue
            stream.push(event.error if isinstance(event, Failure) else event)
