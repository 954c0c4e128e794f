"""``Sequence``: all per-request state the scheduler owns (tokens, KV blocks, RNG, text, adapter hold).

Why one object: preemption, abort and finishing must each undo exactly what admission did; keeping tokens,
block table, adapter reference and generator together makes that a local operation. Only the scheduler
mutates sequences.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from loraplex.engine.output import OutputState
from loraplex.engine.request import FinishReason, GenerationRequest
from loraplex.engine.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    arrival: float  # time.monotonic() at submission, for time limits
    generator: torch.Generator | None  # kept across preemption so seeded sampling is unchanged
    output: OutputState  # detokenizer + stop rules
    token_ids: list[int] = field(default_factory=list)  # prompt + generated; the repetition-penalty history
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    slot: int = -1  # adapter pool slot while RUNNING with an adapter
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    num_charged: int = 0  # positions already charged to the tenant: a recompute after preemption is not re-charged
    # Prompt logprobs gathered so far (entry i scores prompt token i + 1), until delivered once.
    prompt_lp: list[float] = field(default_factory=list)
    prompt_top: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_lp_sent: bool = False

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_token_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def adapter_key(self) -> str | None:
        return self.request.adapter_key

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model before the next sample (prompt chunk or last token)."""
        return self.num_tokens - self.num_computed

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all gathered yet (a recompute after preemption skips them)."""
        return self.params.prompt_logprobs is not None and len(self.prompt_lp) < self.num_prompt - 1

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]
