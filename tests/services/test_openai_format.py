"""Server-sent events as real SSE clients split them into lines.

Found by bench/http_vs_grpc.py: a byte-level model decoded a token to U+0085 (NEL), and httpx's ``aiter_lines``
(the line reader of guidellm and of many hand-written SSE clients; it splits like ``str.splitlines``) cut the event
in two, so the client saw invalid JSON. JSON allows these characters raw inside strings; escaping them keeps every
event on one line for those clients and decodes to the same text.
"""

from __future__ import annotations

import json

import pytest
from httpx._decoders import LineDecoder

from loraplex.services.openai_format import sse

# Every character str.splitlines() breaks on that json.dumps(ensure_ascii=False) leaves unescaped.
SPLITLINES_ONLY = ["\x85", "\u2028", "\u2029"]


def client_lines(event: bytes) -> list[str]:
    """The lines httpx's ``Response.aiter_lines`` yields for this body (its own decoder, fed in one piece)."""
    decoder = LineDecoder()
    return [line for line in [*decoder.decode(event.decode()), *decoder.flush()] if line]


@pytest.mark.parametrize("char", SPLITLINES_ONLY)
def test_an_event_is_one_line_for_splitlines_clients_and_keeps_its_text(char: str) -> None:
    text = f"before{char}after 東京 🙂"
    event = sse({"choices": [{"index": 0, "text": text}]})
    lines = client_lines(event)
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0].removeprefix("data: "))["choices"][0]["text"] == text
    assert event.endswith(b"\n\n") and event.count(b"\n") == 2
    assert "東京 🙂".encode() in event  # other non-ASCII text stays raw UTF-8 (no ensure_ascii bloat)


def test_literal_events_are_unchanged() -> None:
    assert sse("[DONE]") == b"data: [DONE]\n\n"
