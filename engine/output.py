"""Turns each sampled token into the text and finish decision of one request.

Why its own object per sequence: detokenization is incremental (multi-byte characters span tokens) and stop
strings can straddle tokens, so both keep state; this wraps that state plus the stop rules in one place:
user stop ids and stop strings → STOP_SEQUENCE, model EOS → EOS_TOKEN (unless ``ignore_eos``), length →
MAX_TOKENS. Stop and EOS tokens are reported in ``token_ids`` (they were generated) but their text is shown
only for stop ids with ``include_stop``.
"""

from __future__ import annotations

from collections.abc import Collection

from tokenizers import Tokenizer

from loraplex.engine.detokenize import IncrementalDetokenizer, StopStringMatcher
from loraplex.engine.request import FinishReason
from loraplex.engine.sampling import SamplingParams


class OutputState:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: Collection[int],
        max_model_len: int,
    ) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self._stops = StopStringMatcher(params.stop, params.include_stop)
        self._params = params
        self._eos = frozenset(() if params.ignore_eos else eos_token_ids)
        self._stop_ids = frozenset(params.stop_token_ids)
        self._max_len = max_model_len
        self._banned = sorted(self._eos | self._stop_ids)

    def banned(self, num_generated: int) -> list[int]:
        """Tokens the sampler may not pick now: EOS and stop ids until ``min_new_tokens`` are out."""
        return self._banned if num_generated < self._params.min_new_tokens else []

    def on_token(self, token: int, num_generated: int, num_tokens: int) -> tuple[str, FinishReason | None]:
        """Text to emit for ``token`` (already appended) and the finish reason, if this token ends the request."""
        finish: FinishReason | None = None
        show = True
        if token in self._stop_ids:
            finish, show = FinishReason.STOP_SEQUENCE, self._params.include_stop
        elif token in self._eos:
            finish, show = FinishReason.EOS_TOKEN, False
        text = ""
        if show:
            text, matched = self._stops.feed(self._detok.push(token))
            if matched:
                return text, FinishReason.STOP_SEQUENCE
        if finish is None and (num_generated >= self._params.max_new_tokens or num_tokens >= self._max_len):
            finish = FinishReason.MAX_TOKENS
        if finish is not None:
            text += self.drain()
        return text, finish

    def drain(self) -> str:
        """Text held back (partial characters, possible stop-string prefixes) when the request ends otherwise."""
        text, matched = self._stops.feed(self._detok.flush())
        return text if matched else text + self._stops.flush()
