"""OpenAI response bodies and server-sent event streams from a submitted request's deltas.

Why here and not in the endpoints: a whole response and a stream must be built from the same pieces
(``openai_format.ChoiceState``) and must free the engine's resources on every path (``release``); keeping both
shapes side by side makes that easy to check.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from loraplex.engine.request import Delta
from loraplex.registry.errors import LoraplexError
from loraplex.services.engine_servicer import EngineRuntime
from loraplex.services.errors import http_error
from loraplex.services.generation import Submission
from loraplex.services.logs import request_id_var
from loraplex.services.openai_format import (
    ChoiceState,
    CompletionLogprobs,
    TokenNames,
    chat_body,
    chat_chunk,
    chat_logprob_content,
    completion_body,
    completion_chunk,
    sse,
    usage_chunk,
)
from loraplex.services.openai_http import json_body
from loraplex.services.openai_stream import ClientGone, close_quietly, merge, until_disconnect

OFFLOAD_SIZE = 4096  # tokenize, render or name more than this (characters or tokens) in a worker thread
CLIENT_CLOSED = 499  # nginx's "client closed request": logged, never read by anyone
T = TypeVar("T")


@dataclass
class Job:
    """The prompts of one request, submitted, plus what rendering needs."""

    runtime: EngineRuntime
    submissions: list[Submission]
    choices: list[ChoiceState]
    with_logprobs: bool
    response_id: str
    created: int
    model: str
    names: TokenNames


async def whole(request: Request, job: Job, render: Callable[[Job], Awaitable[dict[str, Any]]]) -> Response:
    events = merge(job.submissions)
    try:
        await until_disconnect(request, _drain(events, job))
        return json_body(await render(job))
    except ClientGone:
        return JSONResponse({"error": None}, status_code=CLIENT_CLOSED)
    finally:
        await release(job, events)


async def streamed(request: Request, job: Job, chunks: AsyncIterator[bytes]) -> Response:
    """Wait for the first chunk before answering, so failures before any token get a real HTTP status."""
    try:
        first = await until_disconnect(request, anext(chunks))
    except BaseException as exc:
        await release(job, chunks)
        if isinstance(exc, ClientGone):
            return JSONResponse({"error": None}, status_code=CLIENT_CLOSED)
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        finally:
            await release(job, chunks)

    headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
    return _ClosingStream(body(), media_type="text/event-stream", headers=headers)


class _ClosingStream(StreamingResponse):
    """A streaming response that always closes its body, so ``release`` runs as soon as the client is gone.

    Starlette cancels the sending task on disconnect; if that happens while the body generator is suspended at a
    ``yield``, the generator would otherwise stay open until garbage collection — and its request keep running.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await close_quietly(self.body_iterator)


async def completion_result(job: Job) -> dict[str, Any]:
    logprobs: list[dict[str, Any] | None] = []
    for choice in job.choices:
        if not job.with_logprobs:
            logprobs.append(None)
            continue
        acc = CompletionLogprobs()
        size = sum(len(p.token_ids) for p in choice.pieces)
        await maybe_offload(size, _add_all, acc, choice, job.names)
        logprobs.append(acc.as_dict())
    return completion_body(job.response_id, job.created, job.model, job.choices, logprobs)


async def chat_result(job: Job) -> dict[str, Any]:
    names = job.names
    logprobs = [
        [entry for p in c.pieces for entry in chat_logprob_content(p, names)] if job.with_logprobs else None
        for c in job.choices
    ]
    return chat_body(job.response_id, job.created, job.model, job.choices, logprobs)


async def completion_events(job: Job, include_usage: bool) -> AsyncIterator[bytes]:
    names = job.names
    accs = [CompletionLogprobs() for _ in job.choices]
    extra = {"usage": None} if include_usage else {}
    started = False
    events = merge(job.submissions)
    try:
        async for index, delta in events:
            piece = job.choices[index].feed(delta, job.with_logprobs)
            if not piece.text and not piece.token_ids and piece.finish_reason is None:
                continue
            logprobs = accs[index].add(piece, names) if job.with_logprobs else None
            started = True
            yield sse(completion_chunk(job.response_id, job.created, job.model, index, piece, logprobs, **extra))
    except LoraplexError as exc:
        if not started:
            raise  # nothing sent yet: the caller answers with the error's HTTP status
        yield _stream_error(exc)
    else:
        if include_usage:
            yield sse(usage_chunk(job.response_id, job.created, job.model, "text_completion", job.choices))
    finally:
        await close_quietly(events)
    yield sse("[DONE]")


async def chat_events(job: Job, include_usage: bool) -> AsyncIterator[bytes]:
    names = job.names
    extra = {"usage": None} if include_usage else {}
    rid, created, model = job.response_id, job.created, job.model
    started = False
    events = merge(job.submissions)
    try:
        async for index, delta in events:
            piece = job.choices[index].feed(delta, job.with_logprobs)
            if not started:  # the role chunk waits for the first delta, so early failures keep their status
                started = True
                yield sse(chat_chunk(rid, created, model, 0, {"role": "assistant", "content": ""}, None, **extra))
            logprobs = chat_logprob_content(piece, names) if job.with_logprobs else None
            if piece.text or piece.token_ids:
                content = {"content": piece.text} if piece.text else {}
                yield sse(chat_chunk(rid, created, model, index, content, None, logprobs, **extra))
            if piece.finish_reason is not None:
                yield sse(chat_chunk(rid, created, model, index, {}, piece.finish_reason, **extra))
    except LoraplexError as exc:
        if not started:
            raise
        yield _stream_error(exc)
    else:
        if include_usage:
            yield sse(usage_chunk(rid, created, model, "chat.completion.chunk", job.choices))
    finally:
        await close_quietly(events)
    yield sse("[DONE]")


def _add_all(acc: CompletionLogprobs, choice: ChoiceState, names: TokenNames) -> None:
    for piece in choice.pieces:
        acc.add(piece, names)


async def maybe_offload(size: int, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` here when small, in a worker thread when ``size`` (characters or tokens) is large."""
    if size > OFFLOAD_SIZE:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def _drain(events: AsyncIterator[tuple[int, Delta]], job: Job) -> None:
    async for index, delta in events:
        job.choices[index].feed(delta, job.with_logprobs)


def _stream_error(exc: LoraplexError) -> bytes:
    """A failure after the stream started: one ``data: {"error": …}`` event (then ``[DONE]``), as vLLM does."""
    return sse(http_error(exc, request_id_var.get())[1])


async def release(job: Job, stream: AsyncIterator[Any]) -> None:
    """Abort what did not finish (synchronously first: a cancelled task may not get to await) and close."""
    for submission, choice in zip(job.submissions, job.choices, strict=True):
        if choice.finish_reason is None:
            job.runtime.engine.abort(submission.request_id)
    await close_quietly(stream)
    for submission in job.submissions:
        await close_quietly(submission.deltas)
