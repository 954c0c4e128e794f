"""The one way into the engine for both doors: gRPC (``engine_servicer``) and HTTP (``openai_api``).

Why one front door: both protocols must resolve adapters with the caller's token, start or join the adapter's
fetch, pick the fair-share tenant, submit into the same scheduler (so HTTP and gRPC requests batch together)
and count every outcome the same way. A door only converts its wire format to a ``GenerationInput`` and the
``Delta`` stream back.

The caller's identity comes from the context variables the doors' auth layers set (``principal_var``,
``token_var``), exactly as for every other RPC.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from loraplex.engine.engine import LLMEngine
from loraplex.engine.request import BASE_TENANT, Delta, GenerationRequest
from loraplex.engine.sampling import SamplingParams
from loraplex.registry.errors import FailedPrecondition, InvalidArgument, LoraplexError
from loraplex.registry.refs import namespace_of
from loraplex.services.auth import principal_var, token_var
from loraplex.services.engine_metrics import EngineMetrics
from loraplex.services.fetcher import AdapterFetcher, ResolvedAdapter
from loraplex.services.mixes import MixBuilder, MixRequest, PlannedMix


@dataclass(frozen=True)
class GenerationInput:
    """One request as both doors describe it, already tokenized and validated for shape."""

    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str = ""  # registry reference as sent; "" = the base model
    request_id: str = ""  # "" = generate one
    priority: int = 0
    mix: MixRequest | None = None  # several adapters combined (exclusive with ``adapter``)


@dataclass
class Submission:
    """A submitted request: what it resolved to and its deltas (iterate to the end, or close to abort)."""

    request_id: str
    adapter: ResolvedAdapter | None
    prompt_token_ids: list[int]
    deltas: AsyncIterator[Delta]
    mix: PlannedMix | None = None


class GenerationFrontend:
    """Shared by the gRPC servicer and the HTTP app of one engine process."""

    def __init__(
        self,
        engine: LLMEngine,
        fetcher: AdapterFetcher | None,
        metrics: EngineMetrics,
        mixes: MixBuilder | None = None,
    ) -> None:
        self.engine = engine
        self.fetcher = fetcher
        self.metrics = metrics
        self.mixes = mixes

    def require_fetcher(self) -> AdapterFetcher:
        if self.fetcher is None:
            raise FailedPrecondition("this engine has no registry configured (--registry)", reason="NO_REGISTRY")
        return self.fetcher

    async def submit(self, request: GenerationInput, door: str) -> Submission:
        """Resolve, submit and start the adapter's fetch; typed errors are counted and raised at once."""
        started = time.perf_counter()
        try:
            return await self._submit(request, door, started)
        except LoraplexError as exc:
            self.metrics.count_request(door, exc.code)
            raise
        except asyncio.CancelledError:
            self.metrics.count_request(door, "CANCELLED")
            raise
        except Exception:
            self.metrics.count_request(door, "INTERNAL")
            raise

    async def _submit(self, request: GenerationInput, door: str, started: float) -> Submission:
        if request.adapter and request.mix is not None:
            raise InvalidArgument("adapter and mix are exclusive: name one adapter or a mix", metadata={"field": "mix"})
        request_id = request.request_id or uuid.uuid4().hex
        token = token_var.get()
        resolved: ResolvedAdapter | None = None
        planned: PlannedMix | None = None
        key: str | None = None
        name: str | None = None
        namespace = BASE_TENANT
        if request.mix is not None:
            if self.mixes is None:
                self.require_fetcher()
                raise FailedPrecondition("this engine cannot build adapter mixes", reason="NO_REGISTRY")
            planned = await self.mixes.plan(request.mix, token)
            key, name, namespace = planned.digest, planned.name, namespace_of(planned.members[0].adapter)
        elif request.adapter:
            resolved = await self.require_fetcher().resolve(request.adapter, token)
            key, name, namespace = resolved.digest, request.adapter, namespace_of(resolved.adapter)
        stream = self.engine.generate(
            GenerationRequest(
                request_id,
                request.prompt_token_ids,
                request.params,
                adapter_key=key,
                adapter_name=name,
                tenant=principal_var.get().tenant or namespace,
                priority=request.priority,
            )
        )
        task = None
        if resolved is not None:
            task = self.require_fetcher().ensure(resolved, token)
        elif planned is not None and self.mixes is not None:
            task = self.mixes.ensure(planned)
        if task is not None:
            task.add_done_callback(_consume_exception)
        return Submission(request_id, resolved, request.prompt_token_ids, self._observe(stream, door, started), planned)

    async def _observe(self, stream: AsyncIterator[Delta], door: str, started: float) -> AsyncIterator[Delta]:
        """Relay deltas while recording TTFT, inter-token latency, tokens and the outcome by status code."""
        last_token_at = 0.0
        code = "INTERNAL"
        try:
            async for delta in stream:
                if delta.token_ids:
                    now = time.perf_counter()
                    self.metrics.tokens.inc(len(delta.token_ids))
                    if last_token_at == 0.0:
                        self.metrics.ttft.observe(now - started)
                    else:
                        self.metrics.itl.observe(now - last_token_at)
                    last_token_at = now
                yield delta
            code = "OK"
        except LoraplexError as exc:
            code = exc.code
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        finally:
            self.metrics.count_request(door, code)
            if hasattr(stream, "aclose"):
                await stream.aclose()


def _consume_exception(task: asyncio.Task[None]) -> None:
    """The fetch's failure reaches waiting requests through the engine; don't also log it as unretrieved."""
    if not task.cancelled():
        task.exception()
