"""gRPC face of the engine: validate, resolve the adapter, submit, relay deltas; admin RPCs over the caches.

The request path (DESIGN.md): parse + validate (pure) → resolve the reference with the caller's token (typed
NOT_FOUND / PERMISSION_DENIED / FAILED_PRECONDITION straight from the registry) → submit to the engine → start or
join the adapter's fetch (the request waits in the scheduler's queue, the batch goes on) → relay deltas.
Cancellation and deadlines cancel this handler; closing the engine's iterator aborts the request, which frees
its KV blocks and adapter reference.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from loraplex.engine.adapters.residency import ResidentView
from loraplex.engine.engine import LLMEngine
from loraplex.engine.v1 import engine_service_pb2 as pb
from loraplex.engine.v1 import engine_service_pb2_grpc as pb_grpc
from loraplex.registry.errors import FailedPrecondition, InvalidArgument, LoraplexError, NotFound, Unavailable
from loraplex.registry.refs import namespace_of
from loraplex.services.auth import principal_var, require_admin, token_var
from loraplex.services.engine_convert import (
    check_request_id,
    finish_reason_pb,
    mix_request,
    prompt_token_ids,
    sampling_params,
    tokens_pb,
)
from loraplex.services.engine_metrics import EngineMetrics
from loraplex.services.fetcher import AdapterFetcher, ResolvedAdapter
from loraplex.services.generation import GenerationFrontend, GenerationInput, Submission

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EngineService"].full_name
DOOR = "grpc"


@dataclass
class EngineRuntime:
    """What the servicer needs once the model is loaded (None until then: calls get UNAVAILABLE)."""

    engine: LLMEngine
    fetcher: AdapterFetcher | None
    info: pb.GetModelInfoResponse
    metrics: EngineMetrics
    frontend: GenerationFrontend


class EngineServicer(pb_grpc.EngineServiceServicer):
    def __init__(self) -> None:
        self.runtime: EngineRuntime | None = None

    def _rt(self) -> EngineRuntime:
        if self.runtime is None:
            raise Unavailable("the engine is still loading its model", reason="ENGINE_LOADING")
        return self.runtime

    def _fetcher(self) -> AdapterFetcher:
        fetcher = self._rt().fetcher
        if fetcher is None:
            raise FailedPrecondition("this engine has no registry configured (--registry)", reason="NO_REGISTRY")
        return fetcher

    # -- generation --------------------------------------------------------------------------------------
    async def _submit(self, request: pb.GenerateStreamRequest | pb.GenerateRequest) -> Submission:
        rt = self._rt()
        try:
            check_request_id(request.request_id)
            prompt = prompt_token_ids(request, rt.engine.tokenizer)
            params = sampling_params(request)
            mix = mix_request(request) if request.HasField("mix") else None
        except LoraplexError as exc:
            rt.metrics.count_request(DOOR, exc.code)
            raise
        generation = GenerationInput(
            prompt_token_ids=prompt,
            params=params,
            adapter=request.adapter,
            request_id=request.request_id,
            priority=request.priority,
            mix=mix,
        )
        return await rt.frontend.submit(generation, DOOR)

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: Context
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        submission = await self._submit(request)
        wants_tokens = request.response.token_ids or request.response.logprobs or request.response.top_logprobs > 0
        first = True
        async for delta in submission.deltas:
            message = pb.GenerateStreamResponse(
                request_id=submission.request_id,
                text=delta.text,
                tokens=tokens_pb(delta, wants_tokens),
                usage=pb.Usage(
                    prompt_tokens=delta.usage.prompt_tokens, completion_tokens=delta.usage.completion_tokens
                ),
                finish_reason=finish_reason_pb(delta.finish_reason),  # type: ignore[arg-type]
            )
            if first:
                _decorate_first(message, submission, request.response.prompt_tokens)
                first = False
            yield message

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> pb.GenerateResponse:
        submission = await self._submit(request)
        wants_tokens = request.response.token_ids or request.response.logprobs or request.response.top_logprobs > 0
        response = pb.GenerateResponse(request_id=submission.request_id)
        _decorate_first(response, submission, request.response.prompt_tokens)
        texts: list[str] = []
        async for delta in submission.deltas:
            texts.append(delta.text)
            response.tokens.extend(tokens_pb(delta, wants_tokens))
            response.usage.prompt_tokens = delta.usage.prompt_tokens
            response.usage.completion_tokens = delta.usage.completion_tokens
            response.finish_reason = finish_reason_pb(delta.finish_reason)  # type: ignore[assignment]
        response.text = "".join(texts)
        return response

    # -- model and tokenizer -----------------------------------------------------------------------------
    async def Tokenize(self, request: pb.TokenizeRequest, context: Context) -> pb.TokenizeResponse:
        encoding = self._rt().engine.tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens)
        return pb.TokenizeResponse(token_ids=encoding.ids, tokens=encoding.tokens)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Context) -> pb.GetModelInfoResponse:
        rt = self._rt()
        info = pb.GetModelInfoResponse()
        info.CopyFrom(rt.info)
        merged = rt.engine.stats().merged_adapter
        if merged is not None:
            info.merged_adapter.CopyFrom(_resolved_pb(rt.fetcher.known(merged) if rt.fetcher else None, merged))
        return info

    # -- adapter caches ----------------------------------------------------------------------------------
    async def ListResidentAdapters(
        self, request: pb.ListResidentAdaptersRequest, context: Context
    ) -> pb.ListResidentAdaptersResponse:
        """Every cached adapter the caller may read (admin and auth-off callers see all)."""
        principal = principal_var.get()
        views = self._rt().engine.stats().residents
        readable = [v for v in views if not v.info.adapter or principal.can(namespace_of(v.info.adapter), "read")]
        return pb.ListResidentAdaptersResponse(adapters=[_resident_pb(v) for v in readable])

    async def _fresh_view(self, resolved: ResolvedAdapter) -> ResidentView:
        view = await self._rt().engine.resident(resolved.digest)
        if view is None:
            raise Unavailable(f"{resolved.ref} was evicted before it could be reported", reason="EVICTED")
        return view

    async def PrefetchAdapter(self, request: pb.PrefetchAdapterRequest, context: Context) -> pb.PrefetchAdapterResponse:
        fetcher = self._fetcher()
        if not request.adapter:
            raise InvalidArgument("adapter is required", metadata={"field": "adapter"})
        resolved = await fetcher.resolve(request.adapter, token_var.get())
        task = fetcher.ensure(resolved, token_var.get())
        if task is not None:
            await asyncio.shield(task)
        return pb.PrefetchAdapterResponse(adapter=_resident_pb(await self._fresh_view(resolved), resolved))

    async def EvictAdapter(self, request: pb.EvictAdapterRequest, context: Context) -> pb.EvictAdapterResponse:
        require_admin()
        fetcher = self._fetcher()
        resolved = await fetcher.resolve(request.adapter, token_var.get())
        if not await fetcher.evict(resolved.digest):
            raise NotFound(f"{request.adapter} is not resident in this engine", reason="ADAPTER_NOT_RESIDENT")
        return pb.EvictAdapterResponse(digests=[resolved.digest])

    async def MergeAdapter(self, request: pb.MergeAdapterRequest, context: Context) -> pb.MergeAdapterResponse:
        require_admin()
        resolved = await merge_reference(self._rt(), request.adapter, token_var.get())
        return pb.MergeAdapterResponse(adapter=_resolved_pb(resolved, resolved.digest))

    async def UnmergeAdapter(self, request: pb.UnmergeAdapterRequest, context: Context) -> pb.UnmergeAdapterResponse:
        require_admin()
        rt = self._rt()
        key = await rt.engine.unmerge_adapter()
        if key is None:
            return pb.UnmergeAdapterResponse()
        return pb.UnmergeAdapterResponse(adapter=_resolved_pb(rt.fetcher.known(key) if rt.fetcher else None, key))

    async def PinAdapter(self, request: pb.PinAdapterRequest, context: Context) -> pb.PinAdapterResponse:
        require_admin()
        fetcher = self._fetcher()
        resolved = await fetcher.resolve(request.adapter, token_var.get())
        if request.pinned:
            task = fetcher.ensure(resolved, token_var.get())
            if task is not None:
                await asyncio.shield(task)
        await self._rt().engine.pin_adapter(resolved.digest, request.pinned)
        return pb.PinAdapterResponse(adapter=_resident_pb(await self._fresh_view(resolved), resolved))


def _resolved_pb(resolved: ResolvedAdapter | None, digest: str) -> pb.ResolvedAdapter:
    if resolved is None:
        return pb.ResolvedAdapter(digest=digest)
    return pb.ResolvedAdapter(ref=resolved.ref, adapter=resolved.adapter, version=resolved.version, digest=digest)


def _resident_pb(view: ResidentView, resolved: ResolvedAdapter | None = None) -> pb.ResidentAdapter:
    """Describe a cached adapter; ``resolved`` names it as this caller asked (one digest, many names)."""
    wall = time.time() - (time.monotonic() - view.last_used)
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(wall * 1e9))
    return pb.ResidentAdapter(
        adapter=resolved.adapter if resolved else view.info.adapter,
        version=resolved.version if resolved else view.info.version,
        digest=view.key,
        tier=pb.CACHE_TIER_DEVICE if view.slot is not None else pb.CACHE_TIER_HOST,
        size_bytes=view.nbytes,
        last_used_time=ts,
        pinned=view.pinned,
        active_requests=view.users,
        rank=resolved.rank if resolved else view.info.rank,
    )


async def merge_reference(rt: EngineRuntime, ref: str, token: str) -> ResolvedAdapter:
    """Resolve ``ref`` with ``token``, make it host-resident, fold it into the base weights."""
    if rt.fetcher is None:
        raise FailedPrecondition("this engine has no registry configured (--registry)", reason="NO_REGISTRY")
    if not ref:
        raise InvalidArgument("adapter is required", metadata={"field": "adapter"})
    resolved = await rt.fetcher.resolve(ref, token)
    task = rt.fetcher.ensure(resolved, token)
    if task is not None:
        await asyncio.shield(task)
    await rt.engine.merge_adapter(resolved.digest)
    return resolved


def _decorate_first(
    message: pb.GenerateStreamResponse | pb.GenerateResponse, submission: Submission, echo_prompt: bool
) -> None:
    resolved = submission.adapter
    if submission.mix is not None:
        planned = submission.mix
        message.adapter.CopyFrom(pb.ResolvedAdapter(ref=planned.name, adapter=planned.name, digest=planned.digest))
    if resolved is not None:
        message.adapter.CopyFrom(
            pb.ResolvedAdapter(
                ref=resolved.ref, adapter=resolved.adapter, version=resolved.version, digest=resolved.digest
            )
        )
    if echo_prompt:
        message.prompt_token_ids.extend(submission.prompt_token_ids)
