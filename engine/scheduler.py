"""Continuous-batching scheduler: which sequences run this step, with how many tokens, and what they produced.

Policy (one step):
  1. Running sequences first, highest priority then oldest first: each gets its pending tokens (1 for decode, a
     chunk for a prompt) within the token budget. If KV blocks run out, the running sequence with the lowest
     priority and the latest arrival is preempted (blocks freed, adapter released, requeued with its arrival, so
     it goes back in front of its tenant's queue to be recomputed) until the other one fits.
  2. Then waiting sequences in the ``FairQueue``'s order (aged first, then priority, then the least-served
     tenant, FCFS within a tenant). A sequence whose adapter is not in the host tier yet, or cannot get device
     rows or a slot now, is skipped (others go on: adapter-aware packing); but once an *aged* sequence is blocked
     on the device, only its adapter (and base-model requests) are admitted until it runs, so busy adapters
     drain and it cannot starve. A sequence that cannot get KV blocks stops admission.
  3. Every token scheduled is charged to its tenant's virtual counter (fair share by served tokens), once: the
     recompute after a preemption is not charged again.
Every capacity check (``can_allocate``, ``can_acquire``) happens before the matching commit. An adapter whose
device load fails fails its own requests with the typed error and is dropped; the rest of the step goes on.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from loraplex.engine.adapters.residency import AdapterResidency
from loraplex.engine.context import MERGED_SLOT
from loraplex.engine.fairness import FairQueue
from loraplex.engine.kv_cache import BlockManager
from loraplex.engine.request import Delta, FinishReason, Usage
from loraplex.engine.sampling import SampleOutput
from loraplex.engine.sequence import Sequence, SequenceStatus
from loraplex.registry.errors import LoraplexError


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
    events: list[Event] = field(default_factory=list)  # requests that ended without running (broken adapters)
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


_STAGE_AHEAD = 4  # waiting requests whose adapters are staged when capacity (not the device) stopped admission


def _keep_order(seq: Sequence) -> tuple[int, float]:
    """Running sequences in the order they keep their place: higher priority, then earlier arrival first."""
    return (-seq.request.priority, seq.arrival)


class Scheduler:
    def __init__(
        self,
        limits: SchedulerLimits,
        blocks: BlockManager,
        residency: AdapterResidency,
        queue: FairQueue | None = None,
        on_finished: Callable[[Sequence], None] = lambda seq: None,
    ) -> None:
        self.limits = limits
        self.blocks = blocks
        self.residency = residency
        self.waiting = queue if queue is not None else FairQueue()
        self._on_finished = on_finished
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # total since start, for stats and tests
        self.merged_key: str | None = None  # its requests run on the merged base weights: no pool slot at all
        residency.set_wanted(self.waiting.wants)

    # ---- admission / removal -------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.push(seq)

    def has_work(self) -> bool:
        return bool(len(self.waiting) or self.running)

    def abort(self, request_id: str) -> Delta | None:
        """End a request wherever it is; None if unknown or already finished (abort is idempotent)."""
        for seq in [*self.running, *self.waiting]:
            if seq.request_id == request_id:
                text = seq.output.drain()
                return self._finish(seq, FinishReason.CANCELLED, text=text)
        return None

    def fail_adapter(self, key: str, error: BaseException) -> list[Event]:
        """Fail every waiting request of ``key`` (its fetch or load failed); running ones already hold it."""
        events: list[Event] = []
        for seq in [s for s in self.waiting if s.adapter_key == key]:
            self._finish(seq, FinishReason.CANCELLED)
            events.append(Failure(seq.request_id, error))
        return events

    def expire(self, now: float | None = None) -> list[Event]:
        """End every request past its time limit (called before a step, so its deltas survive a failing step)."""
        now = time.monotonic() if now is None else now
        events: list[Event] = []
        for seq in [*self.running, *self.waiting]:
            limit = seq.params.time_limit_s
            if limit is not None and now - seq.arrival >= limit:
                events.append(self._finish(seq, FinishReason.TIME_LIMIT, text=seq.output.drain()))
        return events

    # ---- one step ------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.limits.max_num_batched_tokens
        self._free_a_seat(budget)
        preempted = False
        order = sorted(self.running, key=_keep_order)
        for seq in order:
            if budget == 0 or seq.status is not SequenceStatus.RUNNING:
                continue
            n = min(seq.num_pending, budget)
            while not self.blocks.can_allocate(seq.block_table, seq.num_computed + n):
                victim = next(s for s in reversed(order) if s.status is SequenceStatus.RUNNING)
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
            self._admit(batch, budget)
        for seq, n in batch.items:
            # Service is what the tenant asked for: recomputing positions a preemption threw away is the engine's
            # choice and is not charged again (else every preemption would tilt fairness against its victim).
            end = seq.num_computed + n
            if end > seq.num_charged:
                self.waiting.charge(seq.request.tenant, end - max(seq.num_computed, seq.num_charged))
                seq.num_charged = end
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

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        adapters = self._running_adapters()
        reserved: str | None = None  # an aged request's adapter that is blocked on the device: it goes next
        now = time.monotonic()
        candidates = self.waiting.candidates()
        for seq in candidates:
            if budget == 0 or len(self.running) >= self.limits.max_num_seqs:
                self._stage_ahead(seq, candidates, batch)
                break
            if seq.status is not SequenceStatus.WAITING:
                continue  # failed with its adapter earlier in this walk
            key = seq.adapter_key
            if key is not None and key == self.merged_key:
                key = None  # merged into the base: admitted like a base-model request
            if key is not None:
                if not self.residency.has(key) or (reserved is not None and key != reserved):
                    continue  # not fetched yet, or holding back for an aged request
                if not self._fits_device(key, adapters):
                    if self.waiting.is_aged(seq, now) and reserved is None:
                        reserved = key
                    continue
            n = min(seq.num_pending, budget)
            if not self.blocks.can_allocate(seq.block_table, seq.num_computed + n):
                break
            if key is not None:
                try:
                    seq.slot = self.residency.acquire(key)
                except LoraplexError as exc:
                    batch.events.extend(self.fail_adapter(key, exc))
                    self.residency.discard(key)
                    continue
                adapters.add(key)
            if seq.adapter_key is not None and key is None:
                seq.slot = MERGED_SLOT
            self.blocks.allocate(seq.block_table, seq.num_computed + n)
            self.waiting.remove(seq)
            self.running.append(seq)
            self.waiting.on_running(seq, True)
            seq.status = SequenceStatus.RUNNING
            batch.items.append((seq, n))
            budget -= n

    def _free_a_seat(self, budget: int) -> None:
        """With every sequence place taken, the first waiting request that could run may take the place of one
        running sequence that ranks clearly below it (that one is preempted: freed and requeued in front).

        Clearly below: a lower effective priority; or, at equal priority, a tenant holding more than its fair share
        of places (``max_num_seqs`` / active tenants) with no less virtual service, while the waiting request's
        tenant holds less than its share. Why: admission order alone cannot help a light tenant whose requests
        arrive while a flooding tenant holds every place; without this its first token waits for some sequence
        to finish. At most one per step, only when the request can then be admitted (token budget, KV blocks,
        device room for its adapter), and a tenant at its fair share is never displaced, so equal tenants do not
        trade places back and forth.
        """
        limit = self.limits.max_num_seqs
        if budget == 0 or len(self.running) < limit or not len(self.waiting):
            return
        now = time.monotonic()
        adapters = self._running_adapters()
        candidate = next((s for s in self.waiting.candidates() if self._could_run(s, adapters)), None)
        if candidate is None:
            return
        queue = self.waiting
        rank = queue.effective_priority(candidate, now)
        seats = collections.Counter(s.request.tenant for s in self.running)
        share = limit / max(1, len(queue.active_tenants()))
        tenant = candidate.request.tenant
        lower = [s for s in self.running if queue.effective_priority(s, now) < rank]
        if not lower and seats[tenant] + 1 <= share:
            lower = [
                s
                for s in self.running
                if queue.effective_priority(s, now) == rank
                and seats[s.request.tenant] > share
                and queue.counter(s.request.tenant) >= queue.counter(tenant)
            ]
        if not lower:
            return
        victim = max(lower, key=lambda s: (-queue.effective_priority(s, now), seats[s.request.tenant], s.arrival))
        needed = self.blocks.needed(candidate.block_table, candidate.num_computed + min(candidate.num_pending, budget))
        if needed <= self.blocks.num_free + len(victim.block_table):
            self._preempt(victim)

    def _could_run(self, seq: Sequence, adapters: set[str]) -> bool:
        """Whether ``seq`` could be admitted once a sequence place is free: its adapter is in the host tier and
        fits on the device (without counting on the place's current holder)."""
        key = seq.adapter_key
        if key is None or key == self.merged_key:
            return True
        return self.residency.has(key) and self._fits_device(key, adapters)

    def _running_adapters(self) -> set[str]:
        return {seq.adapter_key for seq in self.running if seq.adapter_key is not None}

    def _fits_device(self, key: str, adapters: set[str]) -> bool:
        """``key`` (host-resident) can join a step whose running sequences use ``adapters``: within the per-step
        adapter limit, and with device rows and a slot for it (evicting idle residents if need be)."""
        within_limit = key in adapters or len(adapters) < self.limits.max_adapters_per_step
        return within_limit and self.residency.can_acquire(key)

    def _stage_ahead(self, first: Sequence, rest: Iterator[Sequence], batch: ScheduledBatch) -> None:
        """The next waiting requests' adapters go to free device rows now, so admission only references them."""
        for seq in itertools.islice(itertools.chain([first], rest), _STAGE_AHEAD):
            key = seq.adapter_key
            if key is None or seq.status is not SequenceStatus.WAITING:
                continue
            try:
                self.residency.stage(key)
            except LoraplexError as exc:
                batch.events.extend(self.fail_adapter(key, exc))
                self.residency.discard(key)

    # ---- router-protocol views -------------------------------------------------------------------------------
    def adapter_names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(adapters with a running request, adapters whose requests only wait), as clients named them."""
        running = {s.request.adapter_name for s in self.running if s.request.adapter_name}
        waiting = {s.request.adapter_name for s in self.waiting if s.request.adapter_name} - running
        return tuple(sorted(running)), tuple(sorted(waiting))

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
        if seq.status is SequenceStatus.RUNNING and seq.adapter_key is not None and seq.slot >= 0:
            self.residency.release(seq.adapter_key)
        seq.slot = -1

    def unmerging(self, key: str) -> None:
        """``key`` leaves the base weights: its running sequences need their own slot again, or a recompute."""
        for seq in [s for s in self.running if s.slot == MERGED_SLOT and s.adapter_key == key]:
            if self.residency.can_acquire(key):
                seq.slot = self.residency.acquire(key)
            else:
                self._preempt(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Free everything and requeue (by its arrival: in front); it recomputes prompt + output when readmitted."""
        self._release(seq)
        self.running.remove(seq)
        self.waiting.on_running(seq, False)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.push(seq)

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
            self.waiting.on_running(seq, False)
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
