"""The engine's public request/response values (what the gRPC servicer converts to and from protos)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TypeVar

from loraplex.engine.sampling import SamplingParams


class FinishReason(enum.Enum):
    STOP_SEQUENCE = "stop_sequence"  # a user stop string or stop_token_id
    EOS_TOKEN = "eos_token"  # the model's EOS (unless ignore_eos)
    MAX_TOKENS = "max_tokens"  # max_new_tokens, or the model's context length
    TIME_LIMIT = "time_limit"  # params.time_limit_s elapsed since submission
    CANCELLED = "cancelled"  # abort(), or the consumer went away


_T = TypeVar("_T")
BASE_TENANT = "base"  # the fair-share tenant of base-model requests


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter_key: str | None = None  # the adapter version digest (or a mix digest); None = the base model
    adapter_name: str | None = None  # the reference as the client sent it (metrics, router protocol)
    tenant: str = BASE_TENANT  # fair-share tenant: the adapter's namespace, or the caller token's tenant
    priority: int = 0  # higher is admitted first and preempted last


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Delta:
    """What one step added to one request; the last delta of a request carries ``finish_reason``."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: FinishReason | None
    usage: Usage
    # On the first delta after the prompt was processed, when the request asked for prompt logprobs: one entry
    # per prompt token (None for the first, which nothing predicts) and the top alternatives of each.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None


def merge_deltas(first: Delta, second: Delta) -> Delta:
    """``second`` appended to ``first`` (same request, in order): what one delta covering both steps would be."""

    def joined(a: list[_T] | None, b: list[_T] | None) -> list[_T] | None:
        return None if a is None and b is None else [*(a or []), *(b or [])]

    return Delta(
        request_id=first.request_id,
        token_ids=[*first.token_ids, *second.token_ids],
        text=first.text + second.text,
        logprobs=joined(first.logprobs, second.logprobs),
        top_logprobs=joined(first.top_logprobs, second.top_logprobs),
        finish_reason=second.finish_reason,
        usage=second.usage,
        prompt_logprobs=first.prompt_logprobs if first.prompt_logprobs is not None else second.prompt_logprobs,
        prompt_top_logprobs=(
            first.prompt_top_logprobs if first.prompt_top_logprobs is not None else second.prompt_top_logprobs
        ),
    )
