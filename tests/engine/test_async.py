"""The async API: step loop on a thread, streaming deltas, abort by cancellation or close, queue limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.config import EngineConfig
from loraplex.engine.engine import LLMEngine
from loraplex.engine.request import Delta, FinishReason
from loraplex.registry.errors import AdapterNotFound, AlreadyExists, FailedPrecondition, QueueFull, Unavailable
from tests.engine.helpers import request

ARCH = "qwen2"


@pytest.fixture
async def engine(tiny_models: dict[str, Path]) -> AsyncIterator[LLMEngine]:
    eng = LLMEngine.load(
        EngineConfig(
            model_dir=tiny_models[ARCH], block_size=4, kv_cache_blocks=128, max_queue=3, max_adapters_per_step=4
        )
    )
    await eng.start()
    yield eng
    await eng.shutdown()


async def _settle(engine: LLMEngine) -> None:
    for _ in range(200):
        stats = engine.stats()
        if stats.num_running == stats.num_waiting == 0 and engine.num_in_flight() == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("engine did not go idle")


async def test_generate_streams_until_finish(engine: LLMEngine, tiny_adapters: dict[str, dict[str, Path]]) -> None:
    assert engine.model_spec.model_type == "qwen2"
    assert engine.eos_token_ids == (1,)
    key = "sha256:abc"
    await engine.add_adapter(key, HostAdapter.from_peft_dir(tiny_adapters[ARCH]["all-r8"], engine.model_spec, 64))
    await _settle(engine)
    assert engine.has_adapter(key)
    deltas = [
        d async for d in engine.generate(request("g", [5, 6, 7], key, max_new_tokens=5, ignore_eos=True, logprobs=True))
    ]
    assert sum(len(d.token_ids) for d in deltas) == 5  # one delta per step, unless a slow consumer got several
    assert deltas[-1].finish_reason is FinishReason.MAX_TOKENS
    assert deltas[-1].usage.prompt_tokens == 3 and deltas[-1].usage.completion_tokens == 5
    assert all(d.logprobs is not None and d.logprobs[0] <= 0 for d in deltas)
    text = "".join(d.text for d in deltas)
    assert text == engine.tokenizer.decode([t for d in deltas for t in d.token_ids])
    await _settle(engine)
    busy = engine.generate(request("busy", [5, 6], key, max_new_tokens=10_000, ignore_eos=True))
    await anext(busy)
    with pytest.raises(FailedPrecondition, match="in use"):
        await engine.evict_adapter(key)
    await busy.aclose()
    await _settle(engine)
    assert await engine.evict_adapter(key) is True
    await _settle(engine)
    assert not engine.has_adapter(key)
    assert await engine.evict_adapter(key) is False


async def test_cancelling_consumer_aborts(engine: LLMEngine) -> None:
    total = engine.stats().kv_blocks_total
    got: list[Delta] = []

    async def consume() -> None:
        async for d in engine.generate(request("c", [5, 6, 7, 8], None, max_new_tokens=10_000, ignore_eos=True)):
            got.append(d)

    task = asyncio.create_task(consume())
    while len(got) < 3:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _settle(engine)
    assert engine.stats().kv_blocks_free == total


async def test_closing_iterator_aborts_and_queue_full(engine: LLMEngine) -> None:
    total = engine.stats().kv_blocks_total
    stream = engine.generate(request("x", [5, 6], None, max_new_tokens=10_000, ignore_eos=True))
    first = await anext(stream)
    assert first.token_ids
    await stream.aclose()
    await _settle(engine)
    assert engine.stats().kv_blocks_free == total

    streams = [engine.generate(request(f"q{i}", [5, 6], "never-fetched", max_new_tokens=2)) for i in range(3)]
    with pytest.raises(QueueFull):
        engine.generate(request("q3", [5, 6], None))
    with pytest.raises(AlreadyExists):
        engine.generate(request("q0", [5, 6], None))
    assert await engine.evict_adapter("never-fetched") is False  # not host-resident: nothing to evict
    engine.fail_adapter("never-fetched", AdapterNotFound("gone"))
    for s in streams:
        with pytest.raises(AdapterNotFound):
            await anext(s)
    engine.abort("q0")  # idempotent after the end
    await _settle(engine)


async def test_time_limits_are_delivered_even_when_the_step_fails(engine: LLMEngine) -> None:
    """Issue 9 item 7: a request whose time ran out while a failing step ran still gets its TIME_LIMIT end."""
    real_run = engine.core.runner.run
    breaks_at = time.monotonic() + 0.3

    def flaky(batch: Any) -> Any:
        if time.monotonic() > breaks_at:
            raise RuntimeError("simulated device fault")
        return real_run(batch)

    engine.core.runner.run = flaky  # type: ignore[method-assign]
    # "limited" waits for an adapter nobody fetches, so it is still queued when its 0.3 s run out; "busy" keeps
    # a forward pass running until the fault.
    limited = engine.generate(request("limited", [5, 6], "never-fetched", max_new_tokens=5, time_limit_s=0.3))
    busy = engine.generate(request("busy", [5, 6, 7], None, max_new_tokens=10_000, ignore_eos=True))
    deltas = [d async for d in limited]
    assert deltas[-1].finish_reason is FinishReason.TIME_LIMIT
    with pytest.raises(Unavailable) as info:
        async for _ in busy:
            pass
    assert info.value.reason == "STEP_FAILED"
    await _settle(engine)
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total


async def test_a_slow_consumer_gets_ready_deltas_merged(engine: LLMEngine) -> None:
    """Deltas that pile up while the consumer is busy come out as one (fewer messages, nothing lost or reordered)."""
    fast = [
        d
        async for d in engine.generate(
            request("fast", [5, 6, 7], None, max_new_tokens=12, ignore_eos=True, logprobs=True)
        )
    ]
    slow: list[Delta] = []
    async for d in engine.generate(request("slow", [5, 6, 7], None, max_new_tokens=12, ignore_eos=True, logprobs=True)):
        slow.append(d)
        await asyncio.sleep(0.05)  # several steps finish meanwhile
    assert len(slow) < len(fast)
    ids = [t for d in slow for t in d.token_ids]
    assert ids == [t for d in fast for t in d.token_ids]
    assert [lp for d in slow for lp in d.logprobs or []] == pytest.approx([lp for d in fast for lp in d.logprobs or []])
    assert "".join(d.text for d in slow) == "".join(d.text for d in fast)
    assert slow[-1].finish_reason is FinishReason.MAX_TOKENS and slow[-1].usage.completion_tokens == 12
