"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

Why: a decode step launches a few kernels per layer for very little work each, so on a GPU its time is mostly
Python and launch overhead. A graph captured once per bucket (1, 2, 4, 8, ... up to max_num_seqs sequences)
replays the whole forward — LoRA included — with one launch. What makes this correct:

* every tensor a step reads lives at a fixed address: the context and LoRA metadata buffers (``ContextBuilder``,
  ``kernels.lora_step``), the KV caches, the adapter pool; a step only rewrites their contents;
* a step of B sequences runs in the smallest bucket >= B: padding sequences feed token 0 at position 0, write
  their key/value into the scratch KV block no sequence owns and use no adapter; their logits rows are dropped;
* in a bucket every shape a kernel launch depends on is fixed (tokens = sequences = bucket, segment tables of
  min(bucket, slots) entries, block tables of full width), and the Triton launchers read no device values;
* only decode steps whose every sequence wants its one logits row are replayed; prefill, mixed and
  prompt-logprob steps run eagerly.

Capture needs CUDA and the Triton LoRA backend (``LoRABackend.graph_safe``); ``enforce_eager`` disables it.
Without ``capture`` (tests on CPU), ``run`` executes the padded bucket eagerly: the same inputs a replay reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraplex.engine.context import Context, ContextBuilder, SeqSlice

Forward = Callable[[Context], torch.Tensor]  # ctx -> float32 logits [rows, vocab]


def buckets(max_seqs: int) -> list[int]:
    """1, 2, 4, 8, ... below ``max_seqs``, then ``max_seqs`` itself."""
    sizes = [1 << k for k in range(max(1, max_seqs).bit_length()) if (1 << k) < max_seqs]
    return [*sizes, max_seqs]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # static output: float32 [bucket, vocab]


class DecodeGraphs:
    def __init__(self, builder: ContextBuilder, forward: Forward, max_seqs: int, capture: bool = True) -> None:
        self.builder = builder
        self.forward = forward
        self.sizes = buckets(max_seqs)
        self.capture = capture
        self._graphs: dict[int, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None  # one memory pool for every bucket
        self.replays = 0  # decode steps served by this object (tests, stats)

    def bucket(self, slices: list[SeqSlice]) -> int | None:
        """The bucket of a decode step whose every sequence wants its one logits row; None otherwise."""
        if not slices or len(slices) > self.sizes[-1]:
            return None
        if any(len(s.token_ids) != 1 or s.num_logits != 1 for s in slices):
            return None
        return next(size for size in self.sizes if size >= len(slices))

    def capture_all(self) -> None:
        """Capture every bucket, largest first so smaller graphs reuse its memory pool."""
        for size in reversed(self.sizes):
            self._capture(size)

    def run(self, slices: list[SeqSlice]) -> torch.Tensor | None:
        """float32 logits [len(slices), vocab] from the step's bucket, or None if the step is not eligible."""
        size = self.bucket(slices)
        if size is None:
            return None
        self.replays += 1
        if not self.capture:
            return self.forward(self.builder.build(slices, pad_to=size))[: len(slices)]
        captured = self._capture(size)  # before filling: capturing runs dummy steps through the same buffers
        self.builder.build(slices, pad_to=size)  # the graph reads the buffers this fills
        captured.graph.replay()
        return captured.logits[: len(slices)].clone()

    def _capture(self, size: int) -> _Graph:
        """Warm up (autotune, pointer tables, allocator) on a side stream, then capture one padded step."""
        known = self._graphs.get(size)
        if known is not None:
            return known
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(self.builder.build([], pad_to=size))
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        ctx = self.builder.build([], pad_to=size)  # fresh per-step memo: the graph must record every op
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.forward(ctx)
        torch.cuda.synchronize()
        captured = _Graph(graph, logits)
        self._graphs[size] = captured
        return captured
