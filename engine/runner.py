"""Builds one step's tensors from the scheduler's decisions, runs the model, returns logits.

Why separate from the scheduler: the scheduler decides with host integers only; everything that touches the
device (KV caches, context buffers, the LoRA backend, CUDA graphs, forward, logits) is owned here, so
scheduling policy can be tested without a model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraplex.engine.adapters.pool import AdapterPool
from loraplex.engine.config import EngineConfig
from loraplex.engine.context import MERGED_SLOT, AdapterExtras, Context, ContextBuilder, ContextCapacity, SeqSlice
from loraplex.engine.cuda_graphs import DecodeGraphs
from loraplex.engine.kv_cache import allocate_kv_caches, blocks_for
from loraplex.engine.model.build import LoadedModel
from loraplex.engine.model.lora import apply_lora_transform
from loraplex.engine.scheduler import ScheduledBatch
from loraplex.kernels.lora import make_backend
from loraplex.kernels.lora_step import LoRACapacity
from loraplex.kernels.types import LoRABatch


class ModelRunner:
    """Owns the KV caches (plus one scratch block), the LoRA backend, the step buffers and the decode graphs.

    ``num_blocks`` KV blocks are the scheduler's; block ``num_blocks`` is the scratch block padding sequences of a
    CUDA-graph bucket write into. The LoRA backend is chosen once here (``config.lora_backend``) and wrapped into
    the model; attention follows it (Triton kernels with the Triton backend, the torch path otherwise).
    """

    def __init__(self, loaded: LoadedModel, config: EngineConfig, num_blocks: int, pool: AdapterPool) -> None:
        self.model = loaded.model
        self.pool = pool
        self.block_size = config.block_size
        self.device = torch.device(config.device)
        self.kv_caches = allocate_kv_caches(loaded.args, num_blocks + 1, config.block_size, self.device, loaded.dtype)
        max_tokens = max(config.max_num_batched_tokens, config.max_num_seqs)
        capacity = LoRACapacity(max_tokens=max_tokens, max_logits=max_tokens, num_slots=pool.num_slots)
        self.lora = make_backend(config.lora_backend, capacity, self.device)
        apply_lora_transform(self.model, pool, self.lora)
        self.builder = ContextBuilder(
            ContextCapacity(max_tokens, config.max_num_seqs, blocks_for(loaded.max_model_len, config.block_size)),
            config.block_size,
            self.device,
            self.lora,
            triton=self.lora.name == "triton",
            scratch_block=num_blocks,
        )
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager and self.lora.graph_safe:
            self.graphs = DecodeGraphs(self.builder, self._forward, config.max_num_seqs)
            with torch.inference_mode():
                self.graphs.capture_all()

    def slices(self, batch: ScheduledBatch, num_logits: Sequence[int] | None = None) -> list[SeqSlice]:
        """One ``SeqSlice`` per scheduled item. ``num_logits[i]`` overrides item i's logits rows (default: 1 when
        its chunk reaches its last token, so it samples; else 0)."""
        if num_logits is not None and len(num_logits) != len(batch.items):
            raise ValueError(f"num_logits has {len(num_logits)} entries for {len(batch.items)} scheduled sequences")
        return [
            SeqSlice(
                token_ids=seq.token_ids[seq.num_computed : seq.num_computed + n],
                start_pos=seq.num_computed,
                block_table=seq.block_table,
                slot=seq.slot if seq.slot >= 0 else -1,  # MERGED_SLOT needs no LoRA grouping
                num_logits=(1 if seq.num_computed + n == seq.num_tokens else 0)
                if num_logits is None
                else num_logits[i],
            )
            for i, (seq, n) in enumerate(batch.items)
        ]

    def build_context(self, batch: ScheduledBatch, num_logits: Sequence[int] | None = None) -> Context:
        ctx = self.builder.build(self.slices(batch, num_logits))
        ctx.extras = self._extras(batch, ctx)
        return ctx

    def _needs_extras(self, batch: ScheduledBatch) -> bool:
        rows = self.pool.dora.row_of_slot
        return self.pool.merged_slot is not None or any(seq.slot >= 0 and rows[seq.slot] >= 0 for seq, _ in batch.items)

    def _extras(self, batch: ScheduledBatch, ctx: Context) -> AdapterExtras | None:
        """The step's negation grouping (an adapter is merged) and DoRA token rows; registered with the backend."""
        if not self._needs_extras(batch):
            return None
        slots = [seq.slot for seq, n in batch.items for _ in range(n)]
        logit_slots = [batch.items[b][0].slot for b in ctx.logits_seqs]
        unmerge = unmerge_logits = None
        merged = self.pool.merged_slot
        if merged is not None and any(s != MERGED_SLOT for s in slots):  # a step of only merged rows negates nothing
            unmerge = LoRABatch.from_slots([merged if s != MERGED_SLOT else -1 for s in slots], self.device)
            unmerge_logits = LoRABatch.from_slots(
                [merged if s != MERGED_SLOT else -1 for s in logit_slots], self.device
            )
            self.lora.register(unmerge)
            self.lora.register(unmerge_logits)
        rows = self.pool.dora.row_of_slot
        dora = [(t, rows[s]) for t, s in enumerate(slots) if s >= 0 and rows[s] >= 0]
        tokens = dora_rows = None
        if dora:
            tokens = torch.tensor([t for t, _ in dora], dtype=torch.int64, device=self.device)
            dora_rows = torch.tensor([r for _, r in dora], dtype=torch.int64, device=self.device)
        if unmerge is None and tokens is None:
            return None
        return AdapterExtras(unmerge, unmerge_logits, tokens, dora_rows)

    def _forward(self, ctx: Context) -> torch.Tensor:
        hidden = self.model(ctx, self.kv_caches)
        return self.model.compute_logits(hidden, ctx)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, num_logits: Sequence[int] | None = None) -> torch.Tensor:
        """float32 logits [N, vocab]: for each scheduled sequence in order, its trailing ``num_logits`` tokens'
        rows (by default one row per ``batch.sampled`` sequence, in that order)."""
        slices = self.slices(batch, num_logits)
        if self.graphs is not None and not self._needs_extras(batch):  # graphs capture no merge and no DoRA
            logits = self.graphs.run(slices)
            if logits is not None:
                return logits
        ctx = self.builder.build(slices)
        ctx.extras = self._extras(batch, ctx)
        return self._forward(ctx)
