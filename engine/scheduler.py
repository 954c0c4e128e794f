"""Continuous-batching scheduler: which sequences run this step, with how many tokens, and what they produced.

Policy (one step):
  1. Running sequences first, oldest first: each gets its pending tokens (1 for decode, a chunk for a prompt)
     within the token budget. If KV blocks run out, the NEWEST running sequence is preempted (blocks freed,
     adapter released, requeued at the front to be recomputed) until the older one fits.
  2. Then waiting sequences in arrival order while sequences, tokens and blocks allow. A sequence whose adapter
     is not in the host tier yet is skipped (others go on); one whose adapter cannot get a pool slot now is
     skipped too. A sequence that cannot get KV blocks stops admission (first come, first served).
Every capacity check (``can_allocate``, ``can_acquire``) happens before the matching commit.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.adapters.pool import AdapterPool
from loraplex.engine.kv_cache import BlockManager
from loraplex.engine.request import Delta, FinishReason, Usage
from loraplex.engine.sampling import SampleOutput
from loraplex.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class Failure:
    """A request that ended with an error instead of a delta (e.g. its adapter could not be fetched)."""

    request_id: str
    error: BaseException


Event = Delta | Failure
# Per sequence: logprobs of the prompt tokens scored this step (in position order) and their top alternatives.
PromptScores = dict[Sequence, tuple[list[float], list[list[tuple[int, float]]]]]


@dataclass
class ScheduledBatch:
    items: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to run this step)
    events: list[Event] = field(default_factory=list)  # requests that ended without running (time limits)
    # Sequences whose chunk reaches their last token: they sample one token, in this order. Fixed at schedule
    # time because postprocess advances ``num_computed``.
    sampled: list[Sequence] = field(default_factory=list)
    # Per item: how many of its trailing tokens get a logits row (the sampling row, or every token of a prompt
    # chunk whose prompt logprobs were asked for).
    num_logits: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_adapters_per_step: int


class Scheduler:
    def __init__(
        self,
        limits: SchedulerLimits,
        blocks: BlockManager,
        pool: AdapterPool,
        host_adapter: Callable[[str], HostAdapter | None],
        on_finished: Callable[[Sequence], None] = lambda seq: None,
    ) -> None:
        self.limits = limits
        self.blocks = blocks
        self.pool = pool
        self._host_adapter = host_adapter
        self._on_finished = on_finished
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # total since start, for stats and tests

    # ---- admission / removal -------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Delta | None:
        """End a request wherever it is; None if unknown or already finished (abort is idempotent)."""
        for seq in [*self.running, *self.waiting]:
            if seq.request_id == request_id:
                text = seq.output.drain()
                return self._finish(seq, FinishReason.CANCELLED, text=text)
        return None

    def fail_adapter(self, key: str, error: BaseException) -> list[Event]:
        """Fail every waiting request of ``key`` (its fetch failed); running ones already hold the adapter."""
        failed = [seq for seq in self.waiting if seq.adapter_key == key and seq.status is SequenceStatus.WAITING]
        events: list[Event] = []
        for seq in failed:
            self._finish(seq, FinishReason.CANCELLED)
            events.append(Failure(seq.request_id, error))
        return events

    # ---- one step ------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch(events=self._expire(time.monotonic()))
        budget = self.limits.max_num_batched_tokens
        preempted = False
        for seq in list(self.running):
            if budget == 0 or seq.status is not SequenceStatus.RUNNING:
                continue
            n = min(seq.num_pending, budget)
            while not self.blocks.can_allocate(seq.block_table, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.blocks.allocate(seq.block_table, seq.num_computed + n)
            batch.items.append((seq, n))
            budget -= n
        if not preempted:
            budget = self._admit(batch, budget)
        self._mark_logits(batch)
        return batch

    @staticmethod
    def _mark_logits(batch: ScheduledBatch) -> None:
        """Which items sample this step and how many logits rows each needs."""
        for seq, n in batch.items:
            completes = seq.num_computed + n == seq.num_tokens
            samples = completes and seq.params.max_new_tokens > 0
            if samples:
                batch.sampled.append(seq)
            scores_prompt = seq.wants_prompt_logprobs and seq.num_computed < seq.num_prompt - 1
            batch.num_logits.append(n if scores_prompt else int(samples))

    def _admit(self, batch: ScheduledBatch, budget: int) -> int:
        adapters = {seq.adapter_key for seq in self.running if seq.adapter_key is not None}
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.limits.max_num_seqs:
                break
            key = seq.adapter_key
            adapter = None
            if key is not None:
                adapter = self._host_adapter(key)
                if adapter is None:
                    continue  # not fetched yet: wait without blocking others
                new_key = key not in adapters
                if new_key and len(adapters) >= self.limits.max_adapters_per_step:
                    continue
                if not self.pool.can_acquire(key, adapter):
                    continue
            n = min(seq.num_pending, budget)
            if not self.blocks.can_allocate(seq.block_table, seq.num_computed + n):
                break
            if key is not None and adapter is not None:
                seq.slot = self.pool.acquire(key, adapter)
                adapters.add(key)
            self.blocks.allocate(seq.block_table, seq.num_computed + n)
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.status = SequenceStatus.RUNNING
            batch.items.append((seq, n))
            budget -= n
        return budget

    def _expire(self, now: float) -> list[Event]:
        events: list[Event] = []
        for seq in [*self.running, *self.waiting]:
            limit = seq.params.time_limit_s
            if limit is not None and now - seq.arrival >= limit:
                events.append(self._finish(seq, FinishReason.TIME_LIMIT, text=seq.output.drain()))
        return events

    def postprocess(
        self, batch: ScheduledBatch, samples: SampleOutput | None, prompt_scores: PromptScores | None = None
    ) -> list[Event]:
        """Advance computed counts, record prompt logprobs, append sampled tokens, decide finishes."""
        for seq, n in batch.items:
            seq.num_computed += n
        for seq, (scored, alternatives) in (prompt_scores or {}).items():
            seq.prompt_lp.extend(scored)
            seq.prompt_top.extend(alternatives)
        events: list[Event] = list(batch.events)
        for seq, _ in batch.items:  # prompt-only requests (max_new_tokens 0) end once the prompt is scored
            if seq.params.max_new_tokens == 0 and seq.num_computed == seq.num_tokens:
                events.append(self._finish(seq, FinishReason.MAX_TOKENS))
        if samples is None:
            return events
        for i, seq in enumerate(batch.sampled):
            token = samples.token_ids[i]
            seq.token_ids.append(token)
            text, finish = seq.output.on_token(token, seq.num_generated, seq.num_tokens)
            params = seq.params
            logprobs = [samples.logprobs[i]] if params.logprobs else None
            top = [samples.top_logprobs[i]] if params.top_logprobs > 0 else None
            if finish is not None:
                events.append(self._finish(seq, finish, [token], text, logprobs, top))
            else:
                events.append(self._delta(seq, [token], text, logprobs, top, None))
        return events

    # ---- state transitions ---------------------------------------------------------------------------------
    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.num_computed = 0
        if seq.status is SequenceStatus.RUNNING and seq.adapter_key is not None:
            self.pool.release(seq.adapter_key)
        seq.slot = -1

    def _preempt(self, seq: Sequence) -> None:
        """Free everything and requeue at the front; the sequence recomputes prompt + output when readmitted."""
        self._release(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        token_ids: list[int] | None = None,
        text: str = "",
        logprobs: list[float] | None = None,
        top: list[list[tuple[int, float]]] | None = None,
    ) -> Delta:
        self._release(seq)
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._on_finished(seq)
        return self._delta(seq, token_ids or [], text, logprobs, top, reason)

    @staticmethod
    def _delta(
        seq: Sequence,
        token_ids: list[int],
        text: str,
        logprobs: list[float] | None,
        top: list[list[tuple[int, float]]] | None,
        finish: FinishReason | None,
    ) -> Delta:
        prompt_lp: list[float | None] | None = None
        prompt_top: list[list[tuple[int, float]]] | None = None
        if seq.params.prompt_logprobs is not None and not seq.prompt_lp_sent and not seq.wants_prompt_logprobs:
            seq.prompt_lp_sent = True
            prompt_lp = [None, *seq.prompt_lp]
            prompt_top = [[], *seq.prompt_top]
        return Delta(
            prompt_logprobs=prompt_lp,
            prompt_top_logprobs=prompt_top,
            request_id=seq.request_id,
            token_ids=token_ids,
            text=text,
            logprobs=logprobs,
            top_logprobs=top,
            finish_reason=finish,
            usage=Usage(prompt_tokens=seq.num_prompt, completion_tokens=seq.num_generated),
        )
