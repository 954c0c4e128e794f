"""Incremental detokenization on real trained tokenizers, and stop-string matching (property-based)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from loraplex.engine.detokenize import IncrementalDetokenizer, StopStringMatcher

FFFD = "\ufffd"
MULTIBYTE_TEXTS = [
    "naïve café — déjà vu 東京 🙂 emoji and accents",
    "日本語 👍🏽 Ωμέγα ✨ zażółć gęślą jaźń",
    "🙂🙂🙂 東京東京 ééé",
    "plain ascii, the quick brown fox",
    "👩‍👩‍👧‍👦 family, 𝄞 music 𝄢, ٱلْعَرَبِيَّة",
]


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    from tests.fixtures.hf import build_tokenizer

    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(out)
    return Tokenizer.from_file(str(out / "tokenizer.json"))


@pytest.fixture(scope="module")
def metaspace_bpe() -> Tokenizer:
    """A SentencePiece-style tokenizer (▁ for spaces, <0xNN> byte fallback): decoding drops a leading space,
    so context-free per-token decoding would lose spaces, and unknown characters arrive byte by byte."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    # Byte-fallback pieces must be ordinary model vocabulary (as in Llama's tokenizer), not special tokens.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(spec))


def _stream(tok: Tokenizer, prompt: Sequence[int], generated: Sequence[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.push(t) for t in generated]
    tail = detok.flush()
    assert detok.text == "".join(pieces) + tail
    return pieces, tail


# ---------------------------------------------------------------------------------------------- detokenizer


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_multibyte_stream_never_emits_broken_characters(byte_bpe: Tokenizer, text: str) -> None:
    ids = byte_bpe.encode(text).ids
    assert any(FFFD in byte_bpe.decode([i]) for i in ids) or text.isascii()  # tokens really split characters
    pieces, tail = _stream(byte_bpe, [], ids)
    assert all(FFFD not in p for p in pieces)
    assert "".join(pieces) == byte_bpe.decode(ids) == text
    assert tail == ""


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab éç東京日本🙂👍🏽Ωμ—\n")), max_size=40))
def test_random_text_streams_back_exactly(byte_bpe: Tokenizer, text: str) -> None:
    ids = byte_bpe.encode(text).ids
    pieces, tail = _stream(byte_bpe, [], ids)
    assert all(FFFD not in p for p in pieces)
    assert "".join(pieces) + tail == text


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS[:3])
def test_every_prompt_split_point_decodes_in_context(byte_bpe: Tokenizer, text: str) -> None:
    ids = byte_bpe.encode(text).ids
    for split in range(len(ids) + 1):
        prompt, generated = ids[:split], ids[split:]
        pieces, tail = _stream(byte_bpe, prompt, generated)
        # A prompt cut inside a character leaves U+FFFD at its end; the generated token that completes the
        # character emits it whole, so the output is the full text minus the prompt's complete characters.
        prompt_text = byte_bpe.decode(prompt).rstrip(FFFD)
        assert "".join(pieces) + tail == text[len(prompt_text) :], split
        assert all(FFFD not in p for p in pieces)


def test_flush_releases_an_unfinished_character(byte_bpe: Tokenizer) -> None:
    ids = byte_bpe.encode("ok 東").ids
    partial = ids[:-1]
    assert byte_bpe.decode(partial).endswith(FFFD)
    detok = IncrementalDetokenizer(byte_bpe, [])
    pieces = [detok.push(t) for t in partial]
    assert "".join(pieces) == "ok "
    assert detok.pending_tokens > 0
    assert detok.flush() == byte_bpe.decode(partial)[len("ok ") :]
    assert detok.pending_tokens == 0 and detok.flush() == ""
    assert detok.text == byte_bpe.decode(partial)


def test_special_tokens_skipped_or_kept(byte_bpe: Tokenizer) -> None:
    eos = byte_bpe.token_to_id("</s>")
    assert eos is not None
    ids = [*byte_bpe.encode("hello").ids, eos, *byte_bpe.encode(" world").ids]
    pieces, tail = _stream(byte_bpe, [], ids)
    assert "".join(pieces) + tail == "hello world"
    detok = IncrementalDetokenizer(byte_bpe, [], skip_special_tokens=False)
    assert "".join(detok.push(t) for t in ids) + detok.flush() == "hello</s> world"


def test_metaspace_tokenizer_keeps_spaces_with_prompt_context(metaspace_bpe: Tokenizer) -> None:
    text = "hello world, the quick brown fox"
    ids = metaspace_bpe.encode(text).ids
    # Per-token decoding loses the spaces; the windowed decoder must not.
    assert "".join(metaspace_bpe.decode([i]) for i in ids) != text
    for split in (1, 2, len(ids) // 2):
        prompt, generated = ids[:split], ids[split:]
        pieces, tail = _stream(metaspace_bpe, prompt, generated)
        assert metaspace_bpe.decode(prompt) + "".join(pieces) + tail == text
    pieces, tail = _stream(metaspace_bpe, [], ids)
    assert "".join(pieces) + tail == text
    # Characters outside the vocabulary go through byte fallback and must not break either.
    odd = "fox 東京 🙂"
    odd_ids = metaspace_bpe.encode(odd).ids
    pieces, tail = _stream(metaspace_bpe, [], odd_ids)
    assert all(FFFD not in p for p in pieces) and "".join(pieces) + tail == odd


class _CountingDecoder:
    """The real tokenizer, recording how many ids each decode call sees (to check the O(window) cost)."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.sizes: list[int] = []

    def decode(self, ids: list[int], /, skip_special_tokens: bool = True) -> str:
        self.sizes.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_cost_per_token_is_bounded_by_the_window(byte_bpe: Tokenizer) -> None:
    ids = byte_bpe.encode(" ".join(MULTIBYTE_TEXTS) * 10).ids
    assert len(ids) > 1000
    counting = _CountingDecoder(byte_bpe)
    detok = IncrementalDetokenizer(counting, ids[:50])
    pieces = [detok.push(t) for t in ids]
    assert "".join(pieces) + detok.flush() == byte_bpe.decode(ids)
    assert max(counting.sizes) <= 10
    assert len(counting.sizes) <= 2 * len(ids) + 2


# ---------------------------------------------------------------------------------------------- stop strings


def _reference_cut(text: str, stops: Sequence[str], include_stop: bool) -> tuple[str, bool]:
    """The whole-text answer: the occurrence ending first (then starting first) wins."""
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    if not hits:
        return text, False
    end, start = min(hits)
    return text[: end if include_stop else start], True


def _feed_chunks(matcher: StopStringMatcher, chunks: Sequence[str]) -> tuple[str, bool, list[str]]:
    emitted: list[str] = []
    matched = False
    for chunk in chunks:
        out, matched_now = matcher.feed(chunk)
        assert not (matched and out), "text emitted after a stop matched"
        emitted.append(out)
        matched = matched or matched_now
    final = matcher.flush()
    if matched:
        assert final == ""
    emitted.append(final)
    return "".join(emitted), matched, emitted


@st.composite
def _chunked(draw: st.DrawFn) -> tuple[str, list[str], list[str]]:
    text = draw(st.text(alphabet="abc🙂", max_size=30))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    stops = draw(st.lists(st.text(alphabet="abc🙂", min_size=1, max_size=4), max_size=3))
    return text, chunks, stops


@settings(max_examples=400, deadline=None)
@given(case=_chunked(), include_stop=st.booleans())
def test_stop_matcher_equals_whole_text_reference(case: tuple[str, list[str], list[str]], include_stop: bool) -> None:
    text, chunks, stops = case
    emitted, matched, pieces = _feed_chunks(StopStringMatcher(stops, include_stop), chunks)
    assert (emitted, matched) == _reference_cut(text, stops, include_stop)
    # Everything emitted before the final flush is a prefix of the answer: nothing is ever taken back.
    assert emitted.startswith("".join(pieces[:-1]))


def test_stop_spanning_chunks_and_include_stop() -> None:
    m = StopStringMatcher(["###", "END"], include_stop=False)
    assert m.feed("hello #") == ("hello ", False)
    assert m.feed("# wor") == ("## wor", False)
    assert m.feed("ld E") == ("ld ", False)
    assert m.feed("NDtrailing") == ("", True)
    assert m.feed("more") == ("", True) and m.flush() == "" and m.matched
    m = StopStringMatcher(["END"], include_stop=True)
    assert m.feed("abcEN") == ("abc", False)
    assert m.feed("Dxyz") == ("END", True)


def test_held_back_text_is_released_at_flush() -> None:
    m = StopStringMatcher(["stop here"], include_stop=False)
    assert m.feed("we st") == ("we ", False)
    assert m.feed("op he") == ("", False)
    assert m.flush() == "stop he"
    assert StopStringMatcher([], include_stop=False).feed("anything") == ("anything", False)
    with pytest.raises(ValueError, match="empty"):
        StopStringMatcher([""], include_stop=False)


def test_earliest_ending_stop_wins() -> None:
    m = StopStringMatcher(["abcd", "bc"], include_stop=True)
    assert _feed_chunks(m, ["a", "b", "c", "d"])[:2] == ("abc", True)
    m = StopStringMatcher(["xabc", "abc"], include_stop=False)
    assert _feed_chunks(m, ["zxab", "c"])[:2] == ("z", True)


def test_detokenizer_into_stop_matcher_pipeline(byte_bpe: Tokenizer) -> None:
    text = "the quick brown 🙂 fox jumps over the lazy dog"
    ids = byte_bpe.encode(text).ids
    detok = IncrementalDetokenizer(byte_bpe, [])
    matcher = StopStringMatcher(["🙂 fox", "lazy"], include_stop=False)
    out = []
    for t in ids:
        delta, stopped = matcher.feed(detok.push(t))
        out.append(delta)
        if stopped:
            break
    assert stopped and "".join(out) == "the quick brown "
