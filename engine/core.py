"""``EngineCore``: the synchronous engine (scheduler + runner + pools) that one thread drives step by step.

Why synchronous and separate from ``LLMEngine``: every mutation of sequences, KV blocks and the adapter pool
happens here, on one thread, with no locks inside a step; the async wrapper only queues commands and relays
events. Tests drive this class directly to control exactly which step a request joins.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from loraplex.engine.adapters.host_cache import HostTier
from loraplex.engine.adapters.pool import AdapterPool, bytes_per_row
from loraplex.engine.config import EngineConfig
from loraplex.engine.kv_cache import BlockManager, blocks_for, bytes_per_block
from loraplex.engine.model.build import LoadedModel, load_model
from loraplex.engine.model.errors import ModelLoadError
from loraplex.engine.output import OutputState
from loraplex.engine.request import GenerationRequest
from loraplex.engine.runner import ModelRunner
from loraplex.engine.sampling import make_generator, sample
from loraplex.engine.scheduler import Event, Scheduler, SchedulerLimits
from loraplex.engine.sequence import Sequence
from loraplex.engine.stats import EngineStats
from loraplex.registry.errors import InvalidArgument

_DEFAULT_KV_TOKENS_PER_SEQ = 2048


@dataclass
class StepRecord:
    """The last step's logits rows and whose they were (cheap references; read by tests and debugging)."""

    request_ids: list[str] = field(default_factory=list)
    logits: torch.Tensor | None = None


def _num_kv_blocks(config: EngineConfig, loaded: LoadedModel) -> int:
    if config.kv_cache_blocks is not None:
        return config.kv_cache_blocks
    if config.kv_cache_bytes is not None:
        return config.kv_cache_bytes // bytes_per_block(loaded.args, config.block_size, loaded.dtype)
    per_seq = min(loaded.max_model_len, _DEFAULT_KV_TOKENS_PER_SEQ)
    return config.max_num_seqs * blocks_for(per_seq, config.block_size)


def _pool_rows(config: EngineConfig, loaded: LoadedModel) -> int:
    if config.gpu_adapter_rows is not None:
        return config.gpu_adapter_rows
    if config.gpu_adapter_bytes is not None:
        element = torch.empty((), dtype=loaded.dtype).element_size()
        return config.gpu_adapter_bytes // bytes_per_row(loaded.spec, config.lora_embeddings, element)
    return config.max_lora_rank * config.max_adapters_per_step


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, host: HostTier) -> None:
        self.config = config
        self.loaded = loaded
        self.host = host
        self.device = torch.device(config.device)
        self.max_model_len = loaded.max_model_len
        num_blocks = _num_kv_blocks(config, loaded)
        if num_blocks * config.block_size < self.max_model_len:
            raise ModelLoadError(
                f"KV cache of {num_blocks} blocks x {config.block_size} tokens cannot hold one sequence of "
                f"max_model_len {self.max_model_len}; raise the KV budget or lower max_model_len"
            )
        self.pool = AdapterPool(
            loaded.spec,
            num_slots=config.max_adapters_per_step,
            rows=_pool_rows(config, loaded),
            max_rank=config.max_lora_rank,
            device=self.device,
            dtype=loaded.dtype,
            embeddings=config.lora_embeddings,
        )
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.runner = ModelRunner(loaded, config, num_blocks, self.pool)  # KV caches, LoRA backend, CUDA graphs
        limits = SchedulerLimits(config.max_num_seqs, config.max_num_batched_tokens, config.max_adapters_per_step)
        self.scheduler = Scheduler(limits, self.blocks, self.pool, host.get, self._on_finished)
        self.last_step = StepRecord()

    @classmethod
    def load(cls, config: EngineConfig, host: HostTier | None = None) -> EngineCore:
        config.validate()
        device = torch.device(config.device)
        loaded = load_model(Path(config.model_dir), config.dtype, device, config.max_model_len)
        return cls(config, loaded, host or HostTier())

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
        """Validate and build the request's ``Sequence``; safe from any thread (touches no step state).

        Counts the request as a user of its adapter key at once, so the adapter cannot be removed from the host
        tier between submission and admission.
        """
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
        if request.adapter_key is not None:
            self.host.add_user(request.adapter_key)
        return seq

    def add(self, seq: Sequence) -> None:
        """Queue a prepared sequence (step thread only); it waits until its adapter is in the host tier."""
        self.scheduler.add(seq)

    def add_request(self, request: GenerationRequest, arrival: float | None = None) -> None:
        self.add(self.prepare(request, arrival))

    def abort(self, request_id: str) -> list[Event]:
        delta = self.scheduler.abort(request_id)
        return [] if delta is None else [delta]

    def fail_adapter(self, key: str, error: BaseException) -> list[Event]:
        return self.scheduler.fail_adapter(key, error)

    def evict_adapter(self, key: str) -> None:
        """Drop an unreferenced resident from the device pool (after it left the host tier)."""
        if self.pool.refcount(key) == 0:
            self.pool.evict(key)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def _on_finished(self, seq: Sequence) -> None:
        if seq.adapter_key is not None:
            self.host.drop_user(seq.adapter_key)

    # ---- the step ------------------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """schedule → run → sample → postprocess; returns this step's deltas and failures."""
        batch = self.scheduler.schedule()
        if not batch.items:
            return self.scheduler.postprocess(batch, None)
        logits = self.runner.run(batch)
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
        return self.scheduler.postprocess(batch, samples)

    def stats(self) -> EngineStats:
        return EngineStats(
            kv_blocks_free=self.blocks.num_free,
            kv_blocks_total=self.blocks.num_blocks,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            resident_adapters=tuple(self.pool.residents()),
            pool_slots=self.pool.num_slots,
            pool_rows=self.pool.num_rows,
            host_adapters=self.host.snapshot(),
            num_preemptions=self.scheduler.num_preemptions,
        )
