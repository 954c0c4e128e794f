"""OpenAI request bodies (pydantic) and their translation into engine ``SamplingParams``. Pure: no I/O.

Why explicit fields for features loraplex does not implement (``n`` > 1, penalties, ``logit_bias``, tools…):
a client that sets them expects a behaviour; ignoring them would silently return something else, so a
non-default value is a 400 naming the field. Unknown fields are accepted (clients send ``user``, ``metadata``…)
because they change nothing. Extensions use vLLM's names so existing clients work: ``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``, ``priority``,
``return_tokens_as_token_ids``, ``chat_template_kwargs``; loraplex's own: ``mix`` (an adapter mix).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from loraplex.engine.adapters.mix import MixMethod
from loraplex.engine.sampling import MAX_NEW_TOKENS_CAP, SamplingParams
from loraplex.registry.errors import InvalidArgument
from loraplex.services.mixes import MixRequest

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
MAX_PROMPTS_PER_REQUEST = 64
INT32 = 2**31 - 1


class StreamOptions(BaseModel):
    include_usage: bool = False


class WeightedAdapterBody(BaseModel):
    adapter: str = Field(min_length=1)
    weight: float


class MixBody(BaseModel):
    """loraplex extension: several adapters combined for this request (the gRPC ``AdapterMix``); ``model`` then
    names the base model. ``method``: cat (default), linear, ties, dare_linear or dare_ties."""

    adapters: list[WeightedAdapterBody] = Field(min_length=1)
    method: str = "cat"
    density: float | None = None

    def to_request(self) -> MixRequest:
        names = {m.name.lower(): m for m in MixMethod}
        method = names.get(self.method.lower().removeprefix("mix_method_"))
        if method is None:
            raise InvalidArgument(
                f"mix.method must be one of {', '.join(sorted(names))}, got {self.method!r}",
                metadata={"field": "mix.method"},
            )
        return MixRequest(tuple((m.adapter, m.weight) for m in self.adapters), method, self.density)


class SamplingBody(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # Extensions (vLLM's names).
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    priority: int | None = Field(default=None, ge=-INT32, le=INT32)
    return_tokens_as_token_ids: bool = False
    mix: MixBody | None = None  # loraplex extension: an adapter mix (``model`` = the base model)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check_supported(self) -> None:
        """Reject values of features the engine does not implement (see the module docstring)."""
        if self.n != 1:
            raise _unsupported("n", "only n=1 is supported; send several requests instead")
        if self.presence_penalty != 0.0 or self.frequency_penalty != 0.0:
            field = "presence_penalty" if self.presence_penalty != 0.0 else "frequency_penalty"
            raise _unsupported(field, f"{field} is not supported (use repetition_penalty)")
        if self.logit_bias:
            raise _unsupported("logit_bias", "logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise _unsupported("stream_options", "stream_options is only allowed with stream=true")


class CompletionRequest(SamplingBody):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of not in (None, 1):
            raise _unsupported("best_of", "only best_of=1 is supported")
        if self.suffix:
            raise _unsupported("suffix", "suffix (insertion) is not supported")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or token ids (a list of strings or of id lists is a batch)."""
        p = self.prompt
        if isinstance(p, str):
            items: list[str | list[int]] = [p]
        elif not p:
            raise InvalidArgument("prompt must not be empty", metadata={"field": "prompt"})
        elif all(isinstance(x, int) for x in p):
            items = [[x for x in p if isinstance(x, int)]]
        else:
            items = [x for x in p if not isinstance(x, int)]
        if len(items) > MAX_PROMPTS_PER_REQUEST:
            raise InvalidArgument(
                f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request", metadata={"field": "prompt"}
            )
        for item in items:
            if not item:
                raise InvalidArgument("prompts must not be empty", metadata={"field": "prompt"})
        return items


class ChatCompletionRequest(SamplingBody):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise _unsupported("tools", "tool calling is not supported")
        if self.tool_choice not in (None, "none"):
            raise _unsupported("tool_choice", "tool calling is not supported")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise _unsupported("response_format", "only response_format type 'text' is supported")
        if self.top_logprobs and not self.logprobs:
            raise InvalidArgument("top_logprobs requires logprobs=true", metadata={"field": "top_logprobs"})
        for i, message in enumerate(self.messages):
            check_message(i, message)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def check_message(index: int, message: dict[str, Any]) -> None:
    """A message needs a string role and text content (a string, or a list of ``text`` parts)."""
    field = f"messages[{index}]"
    if not isinstance(message.get("role"), str) or not message["role"]:
        raise InvalidArgument(f"{field}.role must be a non-empty string", metadata={"field": field})
    content = message.get("content")
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise InvalidArgument(f"{field}.content must be a string or a list of parts", metadata={"field": field})
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidArgument(f"{field}.content: only text parts are supported", metadata={"field": field})


def _unsupported(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(message, metadata={"field": field})


def sampling_params(
    body: SamplingBody,
    *,
    max_new_tokens: int,
    logprobs: bool = False,
    top_logprobs: int = 0,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The engine's parameters for this body; the engine validates ranges (messages name its fields).

    OpenAI's defaults apply where the body is silent: temperature 1 (sampling), top_p 1.
    """
    values: dict[str, Any] = {}
    if body.min_p is not None:
        values["min_p"] = body.min_p
    if body.repetition_penalty is not None:
        values["repetition_penalty"] = body.repetition_penalty
    if prompt_logprobs is not None:
        values["prompt_logprobs"] = prompt_logprobs
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),  # vLLM's -1 and 0 both mean "off"
        seed=body.seed,
        max_new_tokens=min(max_new_tokens, MAX_NEW_TOKENS_CAP),
        min_new_tokens=body.min_tokens,
        stop=tuple(stop),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs or top_logprobs > 0,
        top_logprobs=top_logprobs,
        **values,
    )
