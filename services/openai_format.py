"""Engine ``Delta``s → OpenAI response bodies: completions and chat, whole or as stream chunks. Pure.

Why one ``ChoiceState`` per choice for both endpoints and both modes: a streamed response must add up to the
non-streamed one (same text, same logprobs, same finish reason, same usage), so both are built from the same
per-delta pieces; only the envelope differs.

Token strings in logprobs are each token decoded on its own (special tokens shown), like vLLM; ``text_offset``
is the running sum of their lengths.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loraplex.engine.request import Delta, FinishReason

FINISH_REASONS = {
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.MAX_TOKENS: "length",
    FinishReason.TIME_LIMIT: "length",
    FinishReason.CANCELLED: "abort",
}
TokenNames = Callable[[Sequence[int]], list[str]]  # token ids -> one string per token


@dataclass
class Piece:
    """What one delta adds to one choice, ready to render."""

    text: str
    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]
    finish_reason: str | None


@dataclass
class ChoiceState:
    """One choice's running totals; ``feed`` turns each delta into a ``Piece``."""

    index: int
    echo_text: str = ""  # prepended to the first piece (completions with echo)
    echo_ids: list[int] = field(default_factory=list)  # prompt tokens listed in logprobs (echo + logprobs)
    text: list[str] = field(default_factory=list)
    pieces: list[Piece] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _started: bool = False

    def feed(self, delta: Delta, with_logprobs: bool) -> Piece:
        ids: list[int] = []
        lps: list[float | None] = []
        tops: list[list[tuple[int, float]] | None] = []
        text = delta.text
        if not self._started:
            self._started = True
            text = self.echo_text + text
            if with_logprobs and self.echo_ids:
                ids, lps, tops = prompt_logprob_rows(delta, self.echo_ids)
        ids += delta.token_ids
        if with_logprobs:
            lps += delta.logprobs if delta.logprobs is not None else [None] * len(delta.token_ids)
            tops += list(delta.top_logprobs or [[] for _ in delta.token_ids])
        reason = FINISH_REASONS[delta.finish_reason] if delta.finish_reason is not None else None
        piece = Piece(text, ids, lps, tops, reason)
        self.text.append(text)
        self.pieces.append(piece)
        self.prompt_tokens = delta.usage.prompt_tokens
        self.completion_tokens = delta.usage.completion_tokens
        if reason is not None:
            self.finish_reason = reason
        return piece


def prompt_logprob_rows(
    delta: Delta, prompt_ids: list[int]
) -> tuple[list[int], list[float | None], list[list[tuple[int, float]] | None]]:
    """The prompt's tokens with the logprobs the engine computed for them (first token: None, as OpenAI)."""
    values: list[float | None] = list(delta.prompt_logprobs or [None] * len(prompt_ids))
    given = delta.prompt_top_logprobs or []
    tops: list[list[tuple[int, float]] | None] = [None, *given[1:]] if given else [None] * len(prompt_ids)
    return list(prompt_ids), values, tops


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def total_usage(choices: Sequence[ChoiceState]) -> dict[str, int]:
    return usage(sum(c.prompt_tokens for c in choices), sum(c.completion_tokens for c in choices))


# ---- completions -----------------------------------------------------------------------------------------
@dataclass
class CompletionLogprobs:
    """OpenAI's legacy logprobs object, accumulated over pieces (``text_offset`` continues across chunks)."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    offset: int = 0

    def add(self, piece: Piece, names: TokenNames) -> dict[str, Any]:
        """Append ``piece`` and return its own slice (what a stream chunk carries)."""
        start = len(self.tokens)
        strings = names(piece.token_ids)
        for i, text in enumerate(strings):
            self.tokens.append(text)
            self.token_logprobs.append(piece.logprobs[i] if i < len(piece.logprobs) else None)
            top = piece.top_logprobs[i] if i < len(piece.top_logprobs) else None
            self.top_logprobs.append(None if top is None else top_dict(top, names))
            self.text_offset.append(self.offset)
            self.offset += len(text)
        return self.as_dict(start)

    def as_dict(self, start: int = 0) -> dict[str, Any]:
        return {
            "tokens": self.tokens[start:],
            "token_logprobs": self.token_logprobs[start:],
            "top_logprobs": self.top_logprobs[start:],
            "text_offset": self.text_offset[start:],
        }


def top_dict(top: list[tuple[int, float]], names: TokenNames) -> dict[str, float]:
    """``{token string: logprob}``; two ids that print alike keep the larger logprob."""
    out: dict[str, float] = {}
    for name, (_, logprob) in zip(names([t for t, _ in top]), top, strict=True):
        out[name] = max(logprob, out.get(name, float("-inf")))
    return out


def completion_body(
    response_id: str,
    created: int,
    model: str,
    choices: Sequence[ChoiceState],
    logprobs: Sequence[dict[str, Any] | None],
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": c.index, "text": "".join(c.text), "logprobs": lp, "finish_reason": c.finish_reason}
            for c, lp in zip(choices, logprobs, strict=True)
        ],
        "usage": total_usage(choices),
    }


def completion_chunk(
    response_id: str, created: int, model: str, index: int, piece: Piece, logprobs: dict[str, Any] | None, **extra: Any
) -> dict[str, Any]:
    choice = {"index": index, "text": piece.text, "logprobs": logprobs, "finish_reason": piece.finish_reason}
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        **extra,
    }


# ---- chat ------------------------------------------------------------------------------------------------
def chat_logprob_content(piece: Piece, names: TokenNames) -> list[dict[str, Any]]:
    """The chat ``logprobs.content`` entries of one piece: token, logprob, UTF-8 bytes, top alternatives."""
    out = []
    for i, name in enumerate(names(piece.token_ids)):
        top = piece.top_logprobs[i] if i < len(piece.top_logprobs) else None
        alternatives = (
            [] if not top else [_chat_token(n, lp) for n, (_, lp) in zip(names([t for t, _ in top]), top, strict=True)]
        )
        logprob = piece.logprobs[i] if i < len(piece.logprobs) else None
        out.append({**_chat_token(name, logprob), "top_logprobs": alternatives})
    return out


def _chat_token(name: str, logprob: float | None) -> dict[str, Any]:
    return {"token": name, "logprob": logprob, "bytes": list(name.encode("utf-8"))}


def chat_body(
    response_id: str,
    created: int,
    model: str,
    choices: Sequence[ChoiceState],
    logprobs: Sequence[list[dict[str, Any]] | None],
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": None if lp is None else {"content": lp},
                "finish_reason": c.finish_reason,
            }
            for c, lp in zip(choices, logprobs, strict=True)
        ],
        "usage": total_usage(choices),
    }


def chat_chunk(
    response_id: str,
    created: int,
    model: str,
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None,
    logprobs: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    choice = {
        "index": index,
        "delta": delta,
        "logprobs": None if logprobs is None else {"content": logprobs},
        "finish_reason": finish_reason,
    }
    return {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
        **extra,
    }


def usage_chunk(
    response_id: str, created: int, model: str, kind: str, choices: Sequence[ChoiceState]
) -> dict[str, Any]:
    """The extra last chunk of ``stream_options.include_usage``: no choices, the whole request's usage."""
    return {
        "id": response_id,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [],
        "usage": total_usage(choices),
    }


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` (or a literal such as ``[DONE]``) and a blank line.

    SSE ends lines only at CR/LF, but many clients read events with ``str.splitlines`` semantics (httpx's
    ``aiter_lines``, hence guidellm), which also break at U+0085, U+2028 and U+2029 — characters JSON leaves raw
    in strings. They are written as ``\\uXXXX`` escapes (the same string once decoded), so every event stays one
    line for those clients too; other non-ASCII text stays raw UTF-8.
    """
    if isinstance(payload, str):
        data = payload
    else:
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        data = data.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f"data: {data}\n\n".encode()
