"""``EngineCore``: the synchronous engine (scheduler + runner + residency) that one thread drives step by step.

Why synchronous and separate from ``LLMEngine``: every mutation of sequences, KV blocks and adapter residency
happens here, on one thread, with no locks inside a step; the async wrapper only queues commands and relays
events. Tests drive this class directly to control exactly which step a request joins.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from loraplex.engine.adapters.base_weights import dense_weight
from loraplex.engine.adapters.dora import dora_column_factor
from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.adapters.merge import MergedAdapter, merge_adapter, unmerge_adapter
from loraplex.engine.adapters.pool import AdapterPool
from loraplex.engine.adapters.residency import AdapterResidency
from loraplex.engine.adapters.types import ModuleKey, ModuleLoRA
from loraplex.engine.config import EngineConfig
from loraplex.engine.fairness import FairQueue
from loraplex.engine.kv_cache import BlockManager
from loraplex.engine.memory import plan_for_device
from loraplex.engine.model.build import LoadedModel, load_model
from loraplex.engine.model.errors import ModelLoadError
from loraplex.engine.output import OutputState
from loraplex.engine.request import GenerationRequest
from loraplex.engine.runner import ModelRunner
from loraplex.engine.sampling import make_generator, prompt_logprobs, sample
from loraplex.engine.scheduler import Event, PromptScores, ScheduledBatch, Scheduler, SchedulerLimits
from loraplex.engine.sequence import Sequence
from loraplex.engine.stats import EngineStats, empty_stats
from loraplex.registry.errors import FailedPrecondition, InvalidArgument

NEGATION_KEY = "__merged-negation__"  # the pool key of the merged adapter's negated delta


@dataclass
class StepRecord:
    """The last step's logits rows and whose they were (cheap references; read by tests and debugging)."""

    request_ids: list[str] = field(default_factory=list)
    logits: torch.Tensor | None = None


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.loaded = loaded
        self.device = torch.device(config.device)
        self.max_model_len = loaded.max_model_len
        plan = plan_for_device(config, loaded, self.device)
        num_blocks = plan.kv_blocks
        if num_blocks * config.block_size < self.max_model_len:
            raise ModelLoadError(
                f"KV cache of {num_blocks} blocks x {config.block_size} tokens cannot hold one sequence of "
                f"max_model_len {self.max_model_len}; raise the KV budget or lower max_model_len"
            )
        self.pool = AdapterPool(
            loaded.spec,
            num_slots=config.max_adapters_per_step,
            rows=plan.pool_rows,
            max_rank=config.max_lora_rank,
            device=self.device,
            dtype=loaded.dtype,
            embeddings=config.lora_embeddings,
            dora_capacity=config.max_dora_adapters,
        )
        self.pool.dora.factor_fn = self._dora_factor
        self.residency = AdapterResidency(self.pool, config.host_adapter_bytes)
        self.merged: tuple[str, MergedAdapter] | None = None  # the adapter folded into the base weights
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.runner = ModelRunner(loaded, config, num_blocks, self.pool)  # KV caches, LoRA backend, CUDA graphs
        limits = SchedulerLimits(config.max_num_seqs, config.max_num_batched_tokens, config.max_adapters_per_step)
        queue = FairQueue(dict(config.tenant_weights), config.max_wait_s)
        self.scheduler = Scheduler(limits, self.blocks, self.residency, queue, self._on_finished)
        self.last_step = StepRecord()
        # Called (on the step thread) when a request names an adapter that is not host-resident, so the owner of
        # fetching can start (or join) its download; requests wait for it without blocking others.
        self.on_adapter_missing: Callable[[str], None] = lambda key: None
        self._stats_cache: tuple[int, EngineStats] = (-1, empty_stats())

    # ---- DoRA and the merged adapter ---------------------------------------------------------------------
    def _dora_factor(self, key: ModuleKey, lora: ModuleLoRA) -> torch.Tensor:
        """DoRA's per-column factor of one module, from the UNMERGED base weight (dequantized if quantized)."""
        if lora.magnitude is None:
            raise ValueError("a DoRA factor needs a magnitude")
        weight = None
        if self.merged is not None:
            weight = self.merged[1].originals.get(key)
        if weight is None:
            weight = dense_weight(self.loaded.model, key)
        return dora_column_factor(weight.to(self.device), lora.a, lora.b, lora.scale, lora.magnitude)

    def merge_adapter(self, key: str) -> None:
        """Fold host-resident adapter ``key`` into the base weights (step thread, between steps).

        Its requests then do no LoRA work (``MERGED_SLOT``); every other token runs the negated delta as an extra
        slice from a pinned pool slot, so base rows and other adapters stay exact. Running sequences of ``key``
        keep their own slot (own delta + negation + merged weights = exact).
        """
        if self.merged is not None:
            raise FailedPrecondition(
                f"adapter {self.merged[0]} is already merged; unmerge it first", reason="ALREADY_MERGED"
            )
        adapter = self.residency.get(key)
        if adapter is None:
            raise FailedPrecondition(f"adapter {key} is not resident; prefetch it first", reason="NOT_RESIDENT")
        if adapter.dora:
            raise FailedPrecondition("a DoRA adapter cannot be merged (its output is not W + a low-rank delta)")
        merged = merge_adapter(self.loaded.model, adapter.modules)
        try:
            slot = self.pool.acquire(NEGATION_KEY, HostAdapter(merged.negated, adapter.rank))
        except BaseException:
            unmerge_adapter(self.loaded.model, merged)
            raise
        self.merged = (key, merged)
        self.pool.merged_slot = slot
        self.scheduler.merged_key = key

    def unmerge_adapter(self) -> str | None:
        """Restore the original base weights bit for bit; returns the key that was merged (None if none)."""
        if self.merged is None:
            return None
        key, merged = self.merged
        self.scheduler.unmerging(key)  # its running sequences get a pool slot back (or are recomputed)
        unmerge_adapter(self.loaded.model, merged)
        self.merged = None
        self.scheduler.merged_key = None
        self.pool.merged_slot = None
        self.pool.release(NEGATION_KEY)
        self.pool.evict(NEGATION_KEY)
        return key

    @classmethod
    def load(cls, config: EngineConfig) -> EngineCore:
        config.validate()
        device = torch.device(config.device)
        loaded = load_model(Path(config.model_dir), config.dtype, device, config.max_model_len, config.quantization)
        return cls(config, loaded)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.loaded.tokenizer

    # ---- requests ------------------------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        """Explicit checks of everything a client controls; raises ``InvalidArgument``."""
        if not request.request_id:
            raise InvalidArgument("request_id is required")
        ids = request.prompt_token_ids
        if not ids:
            raise InvalidArgument("prompt_token_ids must not be empty")
        vocab = self.loaded.args.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise InvalidArgument(f"prompt_token_ids must be integers in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise InvalidArgument(
                f"prompt of {len(ids)} tokens leaves no room to generate (max_model_len {self.max_model_len})"
            )
        request.params.validate(vocab)

    def prepare(self, request: GenerationRequest, arrival: float | None = None) -> Sequence:
        """Validate and build the request's ``Sequence``; safe from any thread (touches no step state)."""
        self.validate(request)
        output = OutputState(
            self.tokenizer,
            request.prompt_token_ids,
            request.params,
            self.loaded.eos_token_ids,
            self.max_model_len,
        )
        seq = Sequence(
            request=request,
            arrival=time.monotonic() if arrival is None else arrival,
            generator=make_generator(request.params, self.device),
            output=output,
        )
        return seq

    def add(self, seq: Sequence) -> None:
        """Queue a prepared sequence (step thread only); it waits until its adapter is in the host tier.

        It counts as a user of its adapter from now on, so the adapter cannot leave the host tier under it.
        """
        key = seq.adapter_key
        if key is not None:
            self.residency.add_user(key)
            if not self.residency.has(key):
                self.on_adapter_missing(key)
        self.scheduler.add(seq)

    def add_request(self, request: GenerationRequest, arrival: float | None = None) -> None:
        self.add(self.prepare(request, arrival))

    def abort(self, request_id: str) -> list[Event]:
        delta = self.scheduler.abort(request_id)
        return [] if delta is None else [delta]

    def fail_adapter(self, key: str, error: BaseException) -> list[Event]:
        return self.scheduler.fail_adapter(key, error)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def _on_finished(self, seq: Sequence) -> None:
        if seq.adapter_key is not None:
            self.residency.drop_user(seq.adapter_key)

    def expire(self) -> list[Event]:
        """Requests past their time limit end now (before the step, so a failing step cannot lose them)."""
        return self.scheduler.expire()

    # ---- the step ------------------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """schedule → run → sample → postprocess; returns this step's deltas and failures."""
        batch = self.scheduler.schedule()
        if not batch.items:
            return self.scheduler.postprocess(batch, None)
        rows = self.runner.run(batch, batch.num_logits)
        logits, scores = self._split_rows(batch, rows)
        seqs = batch.sampled
        self.last_step = StepRecord([s.request_id for s in seqs], logits)
        samples = None
        if seqs:
            samples = sample(
                logits,
                [s.params for s in seqs],
                [s.generator for s in seqs],
                [s.token_ids for s in seqs],
                banned=[s.output.banned(s.num_generated) for s in seqs],
                need_logprobs=any(s.params.logprobs for s in seqs),
            )
        return self.scheduler.postprocess(batch, samples, scores)

    @staticmethod
    def _split_rows(batch: ScheduledBatch, rows: torch.Tensor) -> tuple[torch.Tensor, PromptScores]:
        """The sampling rows ([len(batch.sampled), V], in that order) and the prompt logprobs scored this step.

        Item i owns ``batch.num_logits[i]`` consecutive rows for its last tokens; the last one is its sampling row
        when it samples. A row at prompt position p < len(prompt) - 1 scores prompt token p + 1.
        """
        if len(batch.sampled) == rows.shape[0]:
            return rows, {}  # one row per sampling sequence: the common case, no copies
        sample_rows: list[int] = []
        scores: PromptScores = {}
        first = 0
        sampled = set(batch.sampled)
        for (seq, n), k in zip(batch.items, batch.num_logits, strict=True):
            if k == 0:
                continue
            start_pos = seq.num_computed + n - k  # position of the item's first logits row
            # positions already scored before a preemption are not scored twice
            wanted = [
                (first + j, start_pos + j) for j in range(k) if len(seq.prompt_lp) <= start_pos + j < seq.num_prompt - 1
            ]
            if wanted and seq.params.prompt_logprobs is not None:
                index = torch.tensor([r for r, _ in wanted], dtype=torch.long, device=rows.device)
                targets = [seq.token_ids[pos + 1] for _, pos in wanted]
                scores[seq] = prompt_logprobs(rows.index_select(0, index), targets, seq.params.prompt_logprobs)
            if seq in sampled:
                sample_rows.append(first + k - 1)
            first += k
        index = torch.tensor(sample_rows, dtype=torch.long, device=rows.device)
        return rows.index_select(0, index), scores

    def stats(self) -> EngineStats:
        """An immutable snapshot (step thread only; ``LLMEngine`` publishes one after every step).

        The residency part is rebuilt only when residency changed since the last snapshot.
        """
        version, cached = self._stats_cache
        residents = cached.residents if version == self.residency.version else self.residency.snapshot()
        running_names, waiting_names = self.scheduler.adapter_names()
        stats = EngineStats(
            merged_adapter=None if self.merged is None else self.merged[0],
            kv_blocks_free=self.blocks.num_free,
            kv_blocks_total=self.blocks.num_blocks,
            block_size=self.config.block_size,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            resident_adapters=tuple(self.pool.residents()),
            residents=residents,
            pool_slots=self.pool.num_slots,
            pool_rows=self.pool.num_rows,
            host_bytes=sum(r.nbytes for r in residents),
            host_budget_bytes=self.residency.host_budget,
            num_preemptions=self.scheduler.num_preemptions,
            running_adapter_names=running_names,
            waiting_adapter_names=waiting_names,
            max_adapters_per_step=self.config.max_adapters_per_step,
        )
        self._stats_cache = (self.residency.version, stats)
        return stats
