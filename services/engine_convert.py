"""Engine protos ↔ engine values. Pure functions: validation of shapes the proto cannot express lives here."""

from __future__ import annotations

from tokenizers import Tokenizer

from loraplex.engine.adapters.mix import MixMethod
from loraplex.engine.request import Delta, FinishReason
from loraplex.engine.sampling import SamplingParams
from loraplex.engine.v1 import engine_service_pb2 as pb
from loraplex.registry.errors import InvalidArgument
from loraplex.services.mixes import MixRequest

FINISH_REASONS = {
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.EOS_TOKEN: pb.FINISH_REASON_EOS_TOKEN,
    FinishReason.MAX_TOKENS: pb.FINISH_REASON_MAX_TOKENS,
    FinishReason.TIME_LIMIT: pb.FINISH_REASON_TIME_LIMIT,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}
MAX_PROMPT_CHARS = 1_000_000
MAX_REQUEST_ID = 128

GenerateLike = pb.GenerateStreamRequest | pb.GenerateRequest


def sampling_params(request: GenerateLike) -> SamplingParams:
    """Proto options → ``SamplingParams``; unset optionals keep the engine's defaults (greedy, 16 tokens)."""
    s, stop, resp = request.sampling, request.stopping, request.response
    values: dict[str, object] = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
        if s.HasField(name):
            values[name] = getattr(s, name)
    if stop.HasField("max_new_tokens"):
        values["max_new_tokens"] = stop.max_new_tokens
    time_limit = None
    if stop.HasField("time_limit"):
        time_limit = stop.time_limit.seconds + stop.time_limit.nanos / 1e9
    return SamplingParams(
        **values,  # type: ignore[arg-type]
        min_new_tokens=stop.min_new_tokens,
        stop=tuple(stop.stop_sequences),
        stop_token_ids=tuple(stop.stop_token_ids),
        include_stop=stop.include_stop,
        ignore_eos=stop.ignore_eos,
        logprobs=resp.logprobs,
        top_logprobs=resp.top_logprobs,
        time_limit_s=time_limit,
    )


def mix_request(request: GenerateLike) -> MixRequest:
    """The proto ``AdapterMix`` → ``MixRequest`` (the registry-free checks; members are resolved later)."""
    mix = request.mix
    density = mix.density if mix.HasField("density") else None
    return MixRequest(
        members=tuple((member.adapter, member.weight) for member in mix.adapters),
        method=MixMethod.from_proto(mix.method),
        density=density,
    )


def prompt_token_ids(request: GenerateLike, tokenizer: Tokenizer) -> list[int]:
    kind = request.WhichOneof("input")
    if kind == "text":
        if not request.text:
            raise InvalidArgument("text must not be empty", metadata={"field": "text"})
        if len(request.text) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"text is longer than {MAX_PROMPT_CHARS} characters", metadata={"field": "text"})
        return list(tokenizer.encode(request.text, add_special_tokens=True).ids)
    if kind == "token_ids":
        ids = list(request.token_ids.ids)
        if not ids:
            raise InvalidArgument("token_ids must not be empty", metadata={"field": "token_ids"})
        return ids
    raise InvalidArgument("one of text or token_ids is required", metadata={"field": "input"})


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
        raise InvalidArgument(f"request_id must be ≤ {MAX_REQUEST_ID} printable characters")


def tokens_pb(delta: Delta, wanted: bool) -> list[pb.Token]:
    if not wanted:
        return []
    out = []
    for i, token_id in enumerate(delta.token_ids):
        token = pb.Token(id=token_id)
        if delta.logprobs is not None and i < len(delta.logprobs):
            token.logprob = delta.logprobs[i]
        if delta.top_logprobs is not None and i < len(delta.top_logprobs):
            token.top_logprobs.extend(pb.TopLogprob(id=t, logprob=lp) for t, lp in delta.top_logprobs[i])
        out.append(token)
    return out


def finish_reason_pb(reason: FinishReason | None) -> int:
    return pb.FINISH_REASON_UNSPECIFIED if reason is None else FINISH_REASONS[reason]
