"""The registry's download read-ahead: order kept, bounded memory, closed on early stop, errors surface."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import pytest

from loraplex.services.registry_servicer import read_ahead


class Source:
    def __init__(self, count: int, fail_at: int | None = None):
        self.count, self.fail_at = count, fail_at
        self.read = 0
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        try:
            for i in range(self.count):
                if i == self.fail_at:
                    raise OSError("disk went away")
                self.read += 1
                yield bytes([i % 256]) * 8
        finally:
            self.closed.set()


async def test_keeps_order_and_stays_within_its_window() -> None:
    source = Source(50)
    got: list[bytes] = []
    async for chunk in read_ahead(iter(source), depth=3):
        await asyncio.sleep(0.002)  # a slow client
        assert source.read - len(got) <= 5  # the window (3), the chunk in hand, the one being read
        got.append(chunk)
    assert got == [bytes([i]) * 8 for i in range(50)]
    assert source.closed.wait(2)


async def test_early_stop_closes_the_source_and_ends_the_reader() -> None:
    source = Source(10_000)
    before = threading.active_count()
    async with contextlib.aclosing(read_ahead(iter(source), depth=2)) as chunks:
        async for i, _ in _enumerate(chunks):
            if i == 2:
                break
    assert source.closed.wait(2), "the reader must close the source when the consumer stops"
    deadline = time.monotonic() + 2
    while threading.active_count() > before and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert threading.active_count() <= before
    assert source.read < 10


async def test_read_errors_reach_the_consumer() -> None:
    source = Source(10, fail_at=4)
    got = []
    with pytest.raises(OSError, match="disk went away"):
        async for chunk in read_ahead(iter(source), depth=2):
            got.append(chunk)
    assert len(got) == 4 and source.closed.is_set()


async def _enumerate(it):  # type: ignore[no-untyped-def]
    i = 0
    async for item in it:
        yield i, item
        i += 1
