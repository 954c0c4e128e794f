"""Builds one step's tensors from the scheduler's decisions, runs the model, returns logits.

Why separate from the scheduler: the scheduler decides with host integers only; everything that touches the
device (context tensors, forward, logits) happens here, so scheduling policy can be tested without a model.
"""

from __future__ import annotations

import torch

from loraplex.engine.context import Context, SeqSlice
from loraplex.engine.model.llama import CausalLM
from loraplex.engine.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device

    def build_context(self, batch: ScheduledBatch) -> Context:
        slices = [
            SeqSlice(
                token_ids=seq.token_ids[seq.num_computed : seq.num_computed + n],
                start_pos=seq.num_computed,
                block_table=seq.block_table,
                slot=seq.slot,
                num_logits=k,
            )
            for (seq, n), k in zip(batch.items, batch.num_logits, strict=True)
        ]
        return Context.build(slices, self.block_size, self.device)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """float32 logits [N, vocab]: ``batch.num_logits[i]`` rows for item i (its last tokens), in item order."""
        ctx = self.build_context(batch)
        hidden = self.model(ctx, self.kv_caches)
        return self.model.compute_logits(hidden, ctx)
