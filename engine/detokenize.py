"""Streaming text out of streaming tokens: incremental detokenization and stop-string matching.

Why this is subtle: one token is not one piece of text. A byte-level BPE token can end inside a UTF-8
character (emoji, CJK, accents), and SentencePiece-style decoders change a token's text depending on what
comes before it (the leading-space rule). So text is decoded over a small window of recent tokens and only
the part that is final is emitted: nothing that ends in an incomplete character, nothing twice.

Window semantics (per ``push``)::

    ids = prompt + generated
    prefix_text = decode(ids[prefix_offset:read_offset])       # already emitted, used as decoding context
    new_text    = decode(ids[prefix_offset:])
    if new_text grew past prefix_text and does not end in U+FFFD:
        emit new_text[len(prefix_text):]; prefix_offset, read_offset = read_offset, len(ids)
    (tokens before prefix_offset are dropped, so in the code prefix_offset is always 0)

The window is the last emitted chunk plus held-back tokens, so each push costs O(window), not O(length).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# How many prompt tokens give the first generated tokens their decoding context (leading spaces, merges).
PROMPT_CONTEXT_TOKENS = 5


class TokenDecoder(Protocol):
    """What is needed of a tokenizer: ``tokenizers.Tokenizer`` and Hugging Face fast tokenizers both fit."""

    def decode(self, ids: list[int], /, skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text deltas that are safe to show.

    The concatenation of every ``push`` and the final ``flush`` equals ``decode(generated_ids)`` (decoded in
    the context of the prompt's last tokens, which is what the model saw). A generated token that completes a
    character the prompt left unfinished emits that whole character.
    """

    def __init__(
        self, tokenizer: TokenDecoder, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # The window: ids[:read_offset] were already emitted (or are prompt context), the rest are pending.
        self._ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._pieces)

    @property
    def pending_tokens(self) -> int:
        """Tokens received but not yet turned into emitted text (held back or textless)."""
        return len(self._ids) - self._read_offset

    def push(self, token_id: int) -> str:
        """Add one generated token; returns only the new text that is final (possibly "")."""
        self._ids.append(token_id)
        delta = self._new_text()
        if not delta or delta.endswith(REPLACEMENT_CHAR):
            return ""
        return self._emit(delta)

    def flush(self) -> str:
        """At the end of the stream: emit whatever is held back, even an unfinished character (as U+FFFD)."""
        if self.pending_tokens == 0:
            return ""
        return self._emit(self._new_text())

    def _new_text(self) -> str:
        """Text the pending tokens add to the window's already-emitted text."""
        new_text = self._decode(self._ids)
        start = len(self._prefix_text)
        if self._prefix_text.endswith(REPLACEMENT_CHAR):
            # Only a prompt cut inside a character (or a flushed broken tail) leaves the context ending in
            # U+FFFD; a token completing that character replaces it, so emit from where the texts diverge.
            start = _common_prefix_length(self._prefix_text, new_text)
        return new_text[start:]

    def _emit(self, delta: str) -> str:
        """Slide the window: the text just emitted becomes the decoding context for what follows."""
        # Drop tokens that left the window so memory and decode cost stay O(window), whatever the length.
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        if delta:
            self._pieces.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""


def _common_prefix_length(a: str, b: str) -> int:
    size = min(len(a), len(b))
    for i in range(size):
        if a[i] != b[i]:
            return i
    return size


class StopStringMatcher:
    """Finds stop strings in streamed text and decides what may be emitted.

    Text that might be the beginning of a stop string is held back until it either completes the stop or
    stops being a candidate. On a match the stream ends: the emitted text stops right before the stop string
    (or right after it with ``include_stop``), and nothing later is ever emitted.

    Which stop wins: the occurrence that ends first in the stream (it is the first one that can be known to
    have happened); among occurrences ending at the same character, the one starting earliest. This does not
    depend on how the text was chunked.
    """

    def __init__(self, stops: Sequence[str], include_stop: bool) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self._stops = tuple(dict.fromkeys(stops))
        self._include_stop = include_stop
        self._held = ""
        self._matched = False
        self._longest = max((len(s) for s in self._stops), default=0)

    @property
    def matched(self) -> bool:
        return self._matched

    def feed(self, text: str) -> tuple[str, bool]:
        """Add new text; returns (text safe to emit now, whether a stop string has matched)."""
        if self._matched:
            return "", True
        if not self._stops:
            return text, False
        # Any stop that completes now starts inside the held-back suffix or the new text (the held suffix
        # is the longest candidate tail), so searching this buffer suffices.
        buffer = self._held + text
        cut = self._first_match(buffer)
        if cut is not None:
            self._matched = True
            self._held = ""
            return buffer[:cut], True
        keep = self._candidate_tail(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """At the end of the stream with no match: release the held-back tail."""
        held, self._held = self._held, ""
        return "" if self._matched else held

    def _first_match(self, buffer: str) -> int | None:
        """Where to cut ``buffer`` for the earliest-ending stop occurrence, or None when none occurs."""
        best: tuple[int, int] | None = None  # (end, start)
        for stop in self._stops:
            start = buffer.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best = (start + len(stop), start)
        if best is None:
            return None
        end, start = best
        return end if self._include_stop else start

    def _candidate_tail(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of some stop string."""
        for size in range(min(len(buffer), self._longest - 1), 0, -1):
            tail = buffer[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0
