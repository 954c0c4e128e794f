"""The OpenAI-compatible HTTP door of the engine: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
``/health``.

Why it is thin: everything that matters — resolving the adapter with the caller's token, fair-share tenant,
submission into the one scheduler, metrics — happens in ``GenerationFrontend``, shared with gRPC, so HTTP and
gRPC requests batch together and fail the same way. This module only converts OpenAI bodies to
``GenerationInput``s; ``openai_responses`` turns the ``Delta`` streams back into OpenAI bodies or server-sent
events, ``openai_stream`` makes a client that goes away abort its request, ``openai_http`` holds auth, errors and
the embedded server, ``openai_protocol`` the request bodies, ``chat_template`` the sandboxed chat templates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import Response

from loraplex.engine.sampling import SamplingParams
from loraplex.registry.errors import InvalidArgument, LoraplexError, NotFound, Unavailable
from loraplex.registry.refs import namespace_of, parse_ref
from loraplex.services.auth import TokenAuthority, principal_var
from loraplex.services.chat_template import ChatTemplate, load_chat_template
from loraplex.services.engine_convert import MAX_PROMPT_CHARS
from loraplex.services.engine_servicer import EngineRuntime
from loraplex.services.generation import GenerationInput, Submission
from loraplex.services.logs import request_id_var
from loraplex.services.openai_format import ChoiceState, TokenNames
from loraplex.services.openai_http import RequestContext, install_error_handlers, json_body
from loraplex.services.openai_protocol import (
    DEFAULT_COMPLETION_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingBody,
    sampling_params,
)
from loraplex.services.openai_responses import (
    Job,
    chat_events,
    chat_result,
    completion_events,
    completion_result,
    maybe_offload,
    streamed,
    whole,
)
from loraplex.services.openai_stream import close_quietly

DOOR = "http"
PRIORITY_HEADER = "x-loraplex-priority"
T = TypeVar("T")
RuntimeSource = Callable[[], EngineRuntime | None]


def build_app(
    runtime: RuntimeSource, serving: Callable[[], bool], authority: TokenAuthority, model_dir: Path
) -> FastAPI:
    """The ASGI app; ``runtime`` is read per request (None while the model loads: 503 ``ENGINE_LOADING``)."""
    api = OpenAIApi(runtime, serving, model_dir)
    app = FastAPI(title="loraplex", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(RequestContext, authority=authority)
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/health", api.health, methods=["GET"])
    return app


@dataclass
class _Plan:
    """One request translated for the engine, before submission."""

    prompts: list[list[int]]
    params: SamplingParams
    priority: int
    choices: list[ChoiceState]
    with_logprobs: bool


class OpenAIApi:
    def __init__(self, runtime: RuntimeSource, serving: Callable[[], bool], model_dir: Path) -> None:
        self._runtime = runtime
        self._serving = serving
        self._model_dir = model_dir
        self._template: ChatTemplate | None = None
        self._template_loaded = False
        self._started = int(time.time())

    # ---- endpoints -----------------------------------------------------------------------------------------
    async def health(self) -> Response:
        if self._serving() and self._runtime() is not None:
            return json_body({"status": "serving"})
        state = "loading" if self._runtime() is None else "draining"
        return json_body({"status": state}, status=503)

    async def models(self) -> Response:
        """The base model, then every cached adapter the caller may read (as gRPC ``ListResidentAdapters``)."""
        rt = self.runtime()
        base = rt.info.base_model
        principal = principal_var.get()
        data: list[dict[str, Any]] = [_model_card(base, self._started, "loraplex", base, None)]
        for view in rt.engine.stats().residents:
            info = view.info
            if not info.adapter or not principal.can(namespace_of(info.adapter), "read"):
                continue
            card = _model_card(
                f"{info.adapter}@{info.version}", self._started, namespace_of(info.adapter), info.adapter, base
            )
            data.append({**card, "digest": view.key, "rank": info.rank})
        return json_body({"object": "list", "data": data})

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        rt = self.runtime()
        plan = await _counted(rt, self._plan_completion(rt, body, request))
        job = await self._submit(rt, body, plan, "cmpl")
        if body.stream:
            return await streamed(request, job, completion_events(job, body.include_usage))
        return await whole(request, job, completion_result)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        rt = self.runtime()
        plan = await _counted(rt, self._plan_chat(rt, body, request))
        job = await self._submit(rt, body, plan, "chatcmpl")
        if body.stream:
            return await streamed(request, job, chat_events(job, body.include_usage))
        return await whole(request, job, chat_result)

    # ---- request → engine inputs ---------------------------------------------------------------------------
    def runtime(self) -> EngineRuntime:
        rt = self._runtime()
        if rt is None:
            raise Unavailable("the engine is still loading its model", reason="ENGINE_LOADING")
        return rt

    async def _plan_completion(self, rt: EngineRuntime, body: CompletionRequest, request: Request) -> _Plan:
        body.check_supported()
        prompts = body.prompts()
        max_new = DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens
        # Prompt logprobs are what echo + logprobs shows; echo with max_tokens 0 needs them to be valid at all.
        prompt_logprobs = (body.logprobs or 0) if body.echo and (body.logprobs is not None or max_new == 0) else None
        params = sampling_params(
            body,
            max_new_tokens=max_new,
            logprobs=body.logprobs is not None,
            top_logprobs=body.logprobs or 0,
            prompt_logprobs=prompt_logprobs,
        )
        encoded = [await self._encode(rt, p) for p in prompts]
        choices = []
        for i, (prompt, ids) in enumerate(zip(prompts, encoded, strict=True)):
            echo_text = (prompt if isinstance(prompt, str) else rt.engine.tokenizer.decode(ids)) if body.echo else ""
            echo_ids = ids if body.echo and body.logprobs is not None else []
            choices.append(ChoiceState(i, echo_text=echo_text, echo_ids=echo_ids))
        return _Plan(encoded, params, _priority(body.priority, request), choices, body.logprobs is not None)

    async def _plan_chat(self, rt: EngineRuntime, body: ChatCompletionRequest, request: Request) -> _Plan:
        body.check_supported()
        template = await self._chat_template()
        size = sum(len(str(m.get("content") or "")) for m in body.messages)
        rendered = await maybe_offload(size, template.render, body.messages, body.chat_template_kwargs)
        # The template writes the special tokens itself (transformers tokenizes it with add_special_tokens=False).
        ids = await maybe_offload(len(rendered), _encode, rt, rendered, False)
        limit = body.token_limit
        max_new = limit if limit is not None else max(1, rt.engine.max_model_len - len(ids))
        top = body.top_logprobs or 0
        params = sampling_params(body, max_new_tokens=max_new, logprobs=body.logprobs, top_logprobs=top)
        return _Plan([ids], params, _priority(body.priority, request), [ChoiceState(0)], body.logprobs)

    async def _submit(self, rt: EngineRuntime, body: SamplingBody, plan: _Plan, kind: str) -> Job:
        """Submit every prompt through the front door; on any failure abort those already submitted."""
        adapter = _adapter_ref(body.model, rt)
        mix = body.mix.to_request() if body.mix is not None else None
        base_id = request_id_var.get()
        submissions: list[Submission] = []
        try:
            for i, ids in enumerate(plan.prompts):
                request_id = base_id if len(plan.prompts) == 1 else f"{base_id}-{i}"
                generation = GenerationInput(ids, plan.params, adapter, request_id, plan.priority, mix)
                submissions.append(await rt.frontend.submit(generation, DOOR))
        except BaseException:
            for submitted in submissions:
                rt.engine.abort(submitted.request_id)  # never iterated: closing alone would not abort it
                await close_quietly(submitted.deltas)
            raise
        names = _token_names(rt, body.return_tokens_as_token_ids)
        response_id = f"{kind}-{base_id}"
        return Job(rt, submissions, plan.choices, plan.with_logprobs, response_id, int(time.time()), body.model, names)

    async def _encode(self, rt: EngineRuntime, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"prompt is longer than {MAX_PROMPT_CHARS} characters", metadata={"field": "prompt"})
        return await maybe_offload(len(prompt), _encode, rt, prompt, True)

    async def _chat_template(self) -> ChatTemplate:
        if not self._template_loaded:
            self._template = await asyncio.to_thread(load_chat_template, self._model_dir)
            self._template_loaded = True
        if self._template is None:
            raise InvalidArgument(
                "this model has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); "
                "use /v1/completions with your own prompt format",
                reason="NO_CHAT_TEMPLATE",
            )
        return self._template


# ---- helpers -------------------------------------------------------------------------------------------------
def _model_card(model_id: str, created: int, owner: str, root: str, parent: str | None) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owner, "root": root, "parent": parent}


def _adapter_ref(model: str, rt: EngineRuntime) -> str:
    """Empty for the base model, else the adapter reference as gRPC takes it; anything unknown is a 404."""
    if model == rt.info.base_model:
        return ""
    try:
        parse_ref(model)
    except InvalidArgument:
        raise NotFound(
            f"the model {model!r} does not exist", reason="MODEL_NOT_FOUND", metadata={"model": model}
        ) from None
    if rt.fetcher is None:
        raise NotFound(
            f"the model {model!r} does not exist: this engine serves only {rt.info.base_model!r} (no --registry)",
            reason="MODEL_NOT_FOUND",
            metadata={"model": model},
        )
    return model


def _priority(body_value: int | None, request: Request) -> int:
    """The body's ``priority`` wins over the ``x-loraplex-priority`` header; both are integers."""
    if body_value is not None:
        return body_value
    raw = request.headers.get(PRIORITY_HEADER)
    if raw is None:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgument(f"{PRIORITY_HEADER} must be an integer", metadata={"field": PRIORITY_HEADER}) from None
    if abs(value) > 2**31 - 1:
        raise InvalidArgument(f"{PRIORITY_HEADER} must fit in 32 bits", metadata={"field": PRIORITY_HEADER})
    return value


def _token_names(rt: EngineRuntime, as_ids: bool) -> TokenNames:
    """How logprobs name tokens: each decoded alone (special tokens shown), or ``token_id:<id>`` (vLLM's option)."""
    tokenizer = rt.engine.tokenizer

    def names(ids: Sequence[int]) -> list[str]:
        if as_ids:
            return [f"token_id:{i}" for i in ids]
        return list(tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)) if ids else []

    return names


async def _counted(rt: EngineRuntime, plan: Awaitable[T]) -> T:
    """Count a request refused before it reaches the front door (which counts everything after)."""
    try:
        return await plan
    except LoraplexError as exc:
        rt.metrics.count_request(DOOR, exc.code)
        raise


def _encode(rt: EngineRuntime, text: str, add_special_tokens: bool) -> list[int]:
    return list(rt.engine.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
