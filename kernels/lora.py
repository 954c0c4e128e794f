"""The one LoRA interface the engine calls: a ``LoRABackend`` chosen once per engine.

Model code reaches LoRA math in three hops: ``LoRALinear.forward`` → ``backend.apply`` → a kernel. Once per
step, ``prepare`` writes the step's token→slot grouping into the backend's preallocated buffers
(``kernels.lora_step``); every layer's ``apply`` then reads it. Two backends:

* ``TritonLoRABackend``: the Triton shrink/expand kernels (``kernels.triton_lora``); launches depend on
  tensor shapes only, so a decode step can be captured in a CUDA graph (``graph_safe``);
* ``TorchLoRABackend``: the tiled torch path (``kernels.torch_lora``) for CPU; ``prepare`` also cuts the
  step's segments into tiles once, for every layer.

``make_backend("auto" | "torch" | "triton", ...)`` picks Triton on CUDA and torch elsewhere; the engine's
``lora_backend`` setting forces one (the Triton interpreter on CPU, for tests).

Extending per-adapter behaviour (DoRA factors, adapter mixes): the step metadata only says which pool slot each
token (``LoRABatch.token_slot``) and each segment (``seg_slot``) uses; everything about a slot lives in per-slot
arrays of the pool (``LoRAModuleWeights.ranks``/``scales`` today). A new per-slot array (a DoRA flag or factor
per module) is read by slot in ``apply`` like the scales, with no change to ``prepare`` or its buffers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from loraplex.kernels import torch_lora
from loraplex.kernels.lora_step import LoRACapacity, LoRAStep, LoRAStepMetadata
from loraplex.kernels.types import LoRABatch, LoRAModuleWeights, LoRASlice

__all__ = ["BACKENDS", "LoRABackend", "TorchLoRABackend", "TritonLoRABackend", "make_backend"]

BACKENDS = ("auto", "torch", "triton")


class LoRABackend(ABC):
    """Per-engine LoRA: preallocated step metadata plus the kernels that read it.

    ``tokens`` and ``logits`` are the current step's groupings (views of fixed buffers); layers pass one of
    them to ``apply`` (``Context.lora`` / ``Context.lora_logits``). ``apply`` also accepts any other
    ``LoRABatch`` (tests, benchmarks), at the cost of per-call planning on the torch backend.
    """

    name: ClassVar[str]
    graph_safe: ClassVar[bool]  # prepare() + apply() launch work whose shapes come from buffer views only

    def __init__(self, capacity: LoRACapacity, device: torch.device) -> None:
        self.device = device
        self.metadata = LoRAStepMetadata(capacity, device)
        self.tokens, self.logits = self.metadata.fill(LoRAStep((), (), ()))

    def prepare(self, step: LoRAStep) -> tuple[LoRABatch, LoRABatch]:
        """Fill this step's groupings in place (once per step); returns (tokens, logits rows)."""
        self.tokens, self.logits = self.metadata.fill(step)
        return self.tokens, self.logits

    def register(self, batch: LoRABatch) -> None:
        """Another grouping every layer of this step will use (e.g. the merged adapter's negation): planned once
        here rather than once per layer. Valid until the next ``prepare``."""
        return None

    @abstractmethod
    def apply(self, x: torch.Tensor, out: torch.Tensor, slices: Sequence[LoRASlice], batch: LoRABatch) -> None:
        """Add every slice's delta into ``out`` in place (x: [T, h_in], out: [T, sum(h_out)])."""

    @abstractmethod
    def embedding(self, token_ids: torch.Tensor, w: LoRAModuleWeights, out: torch.Tensor, batch: LoRABatch) -> None:
        """Add embedding-LoRA deltas into ``out`` ([T, hidden]); see ``reference.lora_embedding_ref``."""


class TorchLoRABackend(LoRABackend):
    name = "torch"
    graph_safe = False  # plans from host segments; shapes follow each step

    def __init__(self, capacity: LoRACapacity, device: torch.device) -> None:
        super().__init__(capacity, device)
        self.cache = torch_lora.ChunkCache()
        self._plans: dict[int, torch_lora.TilePlan] = {}
        self._extra: list[LoRABatch] = []

    def prepare(self, step: LoRAStep) -> tuple[LoRABatch, LoRABatch]:
        self._plans = {}  # built on first use: a step without lm_head LoRA never plans its logits rows
        self._extra = []  # registered groupings, kept alive so their ids stay theirs
        return super().prepare(step)

    def register(self, batch: LoRABatch) -> None:
        self._extra.append(batch)
        self._plans[id(batch)] = torch_lora.TilePlan.build(batch)

    def _plan(self, batch: LoRABatch) -> torch_lora.TilePlan:
        if batch is not self.tokens and batch is not self.logits and all(batch is not b for b in self._extra):
            return torch_lora.TilePlan.build(batch)
        plan = self._plans.get(id(batch))
        if plan is None:
            plan = self._plans[id(batch)] = torch_lora.TilePlan.build(batch)
        return plan

    def apply(self, x: torch.Tensor, out: torch.Tensor, slices: Sequence[LoRASlice], batch: LoRABatch) -> None:
        if batch.is_empty or not slices:
            return
        torch_lora.apply(x, out, slices, self._plan(batch), self.cache)

    def embedding(self, token_ids: torch.Tensor, w: LoRAModuleWeights, out: torch.Tensor, batch: LoRABatch) -> None:
        if batch.is_empty:
            return
        torch_lora.embedding(token_ids, w, out, self._plan(batch), self.cache)


class TritonLoRABackend(LoRABackend):
    name = "triton"
    graph_safe = True

    def __init__(self, capacity: LoRACapacity, device: torch.device) -> None:
        from loraplex.kernels import triton_lora  # imported here: torch-only installs never load Triton

        super().__init__(capacity, device)
        self._kernels = triton_lora

    def apply(self, x: torch.Tensor, out: torch.Tensor, slices: Sequence[LoRASlice], batch: LoRABatch) -> None:
        if batch.is_empty or not slices:
            return
        self._kernels.apply_lora(x, out, batch, slices)

    def embedding(self, token_ids: torch.Tensor, w: LoRAModuleWeights, out: torch.Tensor, batch: LoRABatch) -> None:
        self._kernels.lora_embedding(token_ids, batch, w, out)


def resolve_backend(name: str, device: torch.device) -> str:
    """ "auto" → "triton" on CUDA, "torch" elsewhere; anything not in ``BACKENDS`` is a ``ValueError``."""
    if name not in BACKENDS:
        raise ValueError(f"LoRA backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return name


def make_backend(name: str, capacity: LoRACapacity, device: torch.device) -> LoRABackend:
    """The engine's one backend. Triton without the ``triton`` package is an error, never a silent fallback."""
    chosen = resolve_backend(name, device)
    if chosen == "torch":
        return TorchLoRABackend(capacity, device)
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        hint = "install loraplex[gpu] or set lora_backend=torch" if name == "auto" else "install loraplex[gpu]"
        raise RuntimeError(f"the Triton LoRA backend needs the triton package ({hint})") from exc
    return TritonLoRABackend(capacity, device)
