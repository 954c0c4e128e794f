"""Relaying engine delta streams to HTTP clients: merge several requests' streams, notice a client leaving.

Why its own module: this is the part of the HTTP door where a mistake leaks engine memory. A request's KV blocks
and adapter reference are freed only when its deltas iterator is closed or cancelled; these helpers make sure
that happens on every path (finished, failed, client gone, server stopping).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from starlette.requests import Request

from loraplex.engine.request import Delta
from loraplex.services.generation import Submission

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected while we waited on its behalf."""


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` in its own task; if the client disconnects first, cancel it and raise ``ClientGone``.

    The watcher reads the ASGI receive channel (the body was already read), which yields ``http.disconnect``
    when the connection drops; nothing polls.
    """
    work: asyncio.Future[T] = asyncio.ensure_future(awaitable)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        racing: list[asyncio.Future[Any]] = [work, watcher]
        await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        raise ClientGone()
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work


async def merge(submissions: Sequence[Submission]) -> AsyncIterator[tuple[int, Delta]]:
    """Every submission's deltas as ``(index, delta)`` in arrival order; closing this aborts what is unfinished."""
    if len(submissions) == 1:
        deltas = submissions[0].deltas
        try:
            async for delta in deltas:
                yield 0, delta
        finally:
            await close_quietly(deltas)
        return
    queue: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, deltas: AsyncIterator[Delta]) -> None:
        try:
            async for delta in deltas:
                queue.put_nowait((index, delta))
            queue.put_nowait((index, None))
        except Exception as exc:
            queue.put_nowait((index, exc))
        finally:
            await close_quietly(deltas)

    tasks = [asyncio.ensure_future(pump(i, s.deltas)) for i, s in enumerate(submissions)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def close_quietly(iterator: AsyncIterable[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
