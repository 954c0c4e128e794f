"""Per-request sampling: validated parameters, per-request RNG streams, and one batched ``sample`` step.

Why this shape: a continuous batch mixes requests with different parameters, and a seeded request must yield
the same tokens whoever shares its batch and wherever it sits in it. So every row draws its randomness only
from its own ``torch.Generator`` and draws the same amount (one ``Exp(1)`` vector of vocabulary size) on every
step; the token is ``argmax(probs / q)``, an exact sample from ``probs`` (the exponential race / Gumbel
trick). Everything else is per-row tensors, so mixed parameters need no per-row Python branches.

Semantics of one step (the order is the Hugging Face ``generate`` order, so greedy + repetition penalty equals
``model.generate(do_sample=False, repetition_penalty=...)``)::

    logprobs  = log_softmax(raw_logits)                      # reported; never affected by what follows
    x         = repetition_penalty(raw_logits, history)      # history = prompt + output tokens so far
    x[banned] = -inf                                         # e.g. EOS while output < min_new_tokens
    if greedy: token = argmax(x)
    else:      x = x / temperature
               x = top_k(x); x = top_p(x); x = min_p(x)      # each keeps at least the best token
               token = argmax(softmax(x) / q),  q ~ Exp(1)^V from the row's own generator
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loraplex.registry.errors import InvalidArgument

MAX_NEW_TOKENS_CAP = 131_072  # the longest context of current open models; anything above is a client bug
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_TOP_LOGPROBS = 20
GREEDY_TEMPERATURE = 1e-5
_UINT64_LIMIT = 1 << 64


@dataclass(frozen=True)
class SamplingParams:
    """How one request turns logits into tokens and when it stops; immutable for the request's lifetime."""

    temperature: float = 0.0  # 0 (or below GREEDY_TEMPERATURE) → greedy argmax
    top_k: int = 0  # 0 → off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 16
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop: bool = False
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    time_limit_s: float | None = None
    # Log-probabilities of the prompt's own tokens (each given the tokens before it), plus this many top
    # alternatives; None = off. With it, max_new_tokens may be 0: score a prompt without generating.
    prompt_logprobs: int | None = None

    @property
    def is_greedy(self) -> bool:
        """Greedy rows take the argmax and use no randomness (and no generator).

        Temperatures below ``GREEDY_TEMPERATURE`` count as 0: dividing logits by them would overflow to inf
        and make the softmax NaN, while the limit they approach is exactly the argmax.
        """
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self, vocab_size: int) -> None:
        """Reject values that are meaningless or abusive; the message names the offending field."""
        _check_float("temperature", self.temperature, lambda v: v >= 0.0, ">= 0")
        _check_int("top_k", self.top_k, lambda v: v >= 0, ">= 0 (0 disables it)")
        _check_float("top_p", self.top_p, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
        _check_float("min_p", self.min_p, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
        _check_float("repetition_penalty", self.repetition_penalty, lambda v: v > 0.0, "> 0")
        if self.seed is not None:
            _check_int("seed", self.seed, lambda v: 0 <= v < _UINT64_LIMIT, "an unsigned 64-bit integer")
        if self.prompt_logprobs is not None:
            _check_int(
                "prompt_logprobs",
                self.prompt_logprobs,
                lambda v: 0 <= v <= MAX_TOP_LOGPROBS,
                f"in [0, {MAX_TOP_LOGPROBS}]",
            )
        least = 0 if self.prompt_logprobs is not None else 1
        _check_int(
            "max_new_tokens",
            self.max_new_tokens,
            lambda v: least <= v <= MAX_NEW_TOKENS_CAP,
            f"in [{least}, {MAX_NEW_TOKENS_CAP}]" + ("" if least else " (0 needs prompt logprobs)"),
        )
        _check_int("min_new_tokens", self.min_new_tokens, lambda v: v >= 0, ">= 0")
        if self.min_new_tokens > self.max_new_tokens:
            raise InvalidArgument(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})"
            )
        _check_int(
            "top_logprobs",
            self.top_logprobs,
            lambda v: 0 <= v <= MAX_TOP_LOGPROBS,
            f"in [0, {MAX_TOP_LOGPROBS}]",
        )
        self._validate_stops(vocab_size)
        if self.time_limit_s is not None:
            _check_float("time_limit_s", self.time_limit_s, lambda v: v > 0.0, "> 0")

    def _validate_stops(self, vocab_size: int) -> None:
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidArgument("stop must be a tuple of strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        for s in self.stop:
            if not s:
                raise InvalidArgument("stop strings must not be empty")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidArgument(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters")
        if not isinstance(self.stop_token_ids, tuple):
            raise InvalidArgument("stop_token_ids must be a tuple of integers")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, lambda v: 0 <= v < vocab_size, f"token ids in [0, {vocab_size})")


def _check_float(name: str, value: object, ok: Callable[[float], bool], rule: str) -> None:
    """Numbers must be real, finite and satisfy ``ok``; NaN fails every comparison, so it is caught too."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or not ok(float(value)):
        raise InvalidArgument(f"{name} must be {rule}, got {value!r}")


def _check_int(name: str, value: object, ok: Callable[[int], bool], rule: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an integer, got {type(value).__name__}")
    if not ok(value):
        raise InvalidArgument(f"{name} must be {rule}, got {value!r}")


@dataclass(frozen=True)
class SampleOutput:
    """One step's result, one entry per batch row, already on the host.

    ``logprobs[i]`` is the chosen token's log-probability under the raw logits (always filled, it is cheap);
    ``top_logprobs[i]`` is empty unless that row asked for ``top_logprobs > 0``.
    """

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """The request's private random stream: seeded when asked, else from OS entropy; ``None`` for greedy."""
    if params.is_greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(64))
    return generator


def mask_tokens(logits: torch.Tensor, token_ids: Sequence[int]) -> None:
    """Forbid ``token_ids`` in place (``-inf``); works on one row ``[V]`` or a batch ``[B, V]``.

    Prefer ``sample(..., banned=...)``: it masks after the logprobs are taken, so reported logprobs stay the
    model's own.
    """
    if token_ids:
        logits[..., list(token_ids)] = float("-inf")


def apply_repetition_penalty(
    logits: torch.Tensor, penalties: Sequence[float], histories: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Hugging Face semantics: for every token seen in the history, positive logits are divided by the
    penalty and negative ones multiplied (each token once, however often it occurred). Returns a new tensor.

    logits: [B, V]; penalties and histories: one per row.
    """
    out = logits.clone()
    rows = [i for i, p in enumerate(penalties) if p != 1.0 and len(histories[i]) > 0]
    if not rows:
        return out
    longest = max(len(histories[i]) for i in rows)
    # Pad each history with its own first token: repeats are harmless because the penalty is per token.
    padded = [list(histories[i]) + [histories[i][0]] * (longest - len(histories[i])) for i in rows]
    index = torch.tensor(padded, dtype=torch.long, device=logits.device)  # [R, L]
    row_index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    penalty = torch.tensor([penalties[i] for i in rows], dtype=logits.dtype, device=logits.device)[:, None]
    seen = out[row_index].gather(1, index)  # [R, L]
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    sub = out[row_index]
    sub.scatter_(1, index, seen)
    out[row_index] = sub
    return out


def filter_logits(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    *,
    any_top_p: bool = True,
    max_top_k: int | None = None,
) -> torch.Tensor:
    """top_k → top_p → min_p on already temperature-scaled logits; removed entries become ``-inf``.

    logits: [B, V] float32; top_k: [B] long (0 = off); top_p, min_p: [B] float32. Every filter keeps the best
    token, ties at the top-k boundary are all kept (as Hugging Face does), and a row with top_p == 1 is never
    cut by float rounding of the cumulative sum. The keyword hints let the caller skip work it knows is not
    needed without a device sync: ``any_top_p=False`` (no row has top_p < 1) plus ``max_top_k`` (every row
    has 1 <= top_k <= max_top_k) replace the full vocabulary sort by a ``topk``.
    """
    vocab = logits.shape[-1]
    if not any_top_p and max_top_k is not None:
        ranked = torch.topk(logits, min(max_top_k, vocab), dim=-1).values  # [B, K], descending
    else:
        ranked = torch.sort(logits, dim=-1, descending=True, stable=True).values  # [B, V]
    width = ranked.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=width), torch.full_like(top_k, width))
    kth = ranked.gather(1, (k - 1)[:, None])  # [B, 1]
    logits = logits.masked_fill(logits < kth, float("-inf"))

    if any_top_p:
        # Keep the smallest prefix (by descending probability) whose mass reaches top_p.
        ranked = ranked.masked_fill(ranked < kth, float("-inf"))
        sorted_probs = torch.softmax(ranked, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        cut = (mass_before >= top_p[:, None]) & (top_p < 1.0)[:, None]
        cut[:, 0] = False
        # The smallest kept logit is the threshold; ties with it survive, which keeps the filter order-free.
        kept_min = ranked.masked_fill(cut, float("inf")).amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kept_min, float("-inf"))

    probs = torch.softmax(logits, dim=-1)
    floor = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < floor, float("-inf"))


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    histories: Sequence[Sequence[int]],
    *,
    banned: Sequence[Sequence[int]] | None = None,
    need_logprobs: bool = True,
) -> SampleOutput:
    """Choose one token per row. See the module docstring for the exact order of operations.

    logits: [B, V] (any float dtype; computed in float32). ``histories[i]`` is prompt + output so far (only
    read when that row's repetition penalty is not 1). ``banned[i]`` are token ids the row may not pick this
    step (the caller passes EOS / stop ids while fewer than ``min_new_tokens`` were generated).
    ``need_logprobs=False`` (no row of the step reports logprobs) skips the vocabulary-wide logsumexp and
    fills ``logprobs`` with NaN; rows asking for ``top_logprobs`` still get theirs.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    if not (len(params) == len(generators) == len(histories) == batch):
        raise ValueError("params, generators and histories need one entry per logits row")
    if banned is not None and len(banned) != batch:
        raise ValueError("banned needs one entry per logits row")
    raw = logits.float()
    plain = all(p.is_greedy and p.repetition_penalty == 1.0 for p in params) and not (
        banned is not None and any(banned)
    )
    # All-greedy batch with nothing to mask: one argmax over the raw logits, no copies (the common case).
    chosen = raw.argmax(dim=-1) if plain else _choose(raw, params, generators, histories, banned)
    wants_top = any(p.top_logprobs > 0 for p in params)
    logprobs = [math.nan] * batch
    top: list[list[tuple[int, float]]] = [[] for _ in params]
    if need_logprobs or wants_top:
        # log_softmax(raw) = raw - logsumexp(raw); only [B] is kept, never a second [B, V] buffer.
        log_z = torch.logsumexp(raw, dim=-1)  # [B]
        if need_logprobs:
            logprobs = (raw.gather(1, chosen[:, None]).squeeze(1) - log_z).tolist()
        top = [
            _top_logprobs(raw[i] - log_z[i], p.top_logprobs) if p.top_logprobs > 0 else [] for i, p in enumerate(params)
        ]
    return SampleOutput(token_ids=chosen.tolist(), logprobs=logprobs, top_logprobs=top)


def _choose(
    raw: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    histories: Sequence[Sequence[int]],
    banned: Sequence[Sequence[int]] | None,
) -> torch.Tensor:
    """[B] token ids for a batch that penalises, masks or samples (the general path)."""
    device = raw.device
    batch = raw.shape[0]
    x = apply_repetition_penalty(raw, [p.repetition_penalty for p in params], histories)
    if banned is not None:
        for i, ids in enumerate(banned):
            mask_tokens(x[i], ids)
    chosen = torch.empty(batch, dtype=torch.long, device=device)
    greedy = [i for i, p in enumerate(params) if p.is_greedy]
    random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if greedy:
        g_index = torch.tensor(greedy, dtype=torch.long, device=device)
        chosen[g_index] = x[g_index].argmax(dim=-1)
    if random_rows:
        r_index = torch.tensor(random_rows, dtype=torch.long, device=device)
        chosen[r_index] = _sample_rows(
            x[r_index], [params[i] for i in random_rows], [generators[i] for i in random_rows]
        )
    return chosen


def _sample_rows(
    x: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """x: [R, V] penalised logits of the non-greedy rows → [R] sampled token ids."""
    device = x.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
    scaled = x / temperature[:, None]
    if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
        any_top_p = any(p.top_p < 1.0 for p in params)
        all_top_k = all(p.top_k > 0 for p in params)
        max_top_k = max(p.top_k for p in params) if all_top_k else None
        scaled = filter_logits(scaled, top_k, top_p, min_p, any_top_p=any_top_p, max_top_k=max_top_k)
    probs = torch.softmax(scaled, dim=-1)  # [R, V]
    q = torch.empty_like(probs)  # [R, V]
    for row, generator in enumerate(generators):
        if generator is None:
            raise ValueError("a sampling row (temperature > 0) needs a generator; see make_generator")
        # Exactly V draws per row per step, whatever the batch: this is what makes seeds batch-invariant.
        q[row].exponential_(generator=generator)
    # An Exp(1) draw can be exactly 0; clamping keeps 0/0 out while leaving the race's winner unchanged.
    q.clamp_(min=torch.finfo(torch.float32).tiny)
    return (probs / q).argmax(dim=-1)


def prompt_logprobs(
    logits: torch.Tensor, targets: Sequence[int], top: int
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-probabilities of ``targets[i]`` under row i of ``logits`` ([N, V], raw), and each row's ``top`` best.

    Row i is the model's prediction after prompt position p, ``targets[i]`` the prompt token at p + 1; like every
    reported logprob these come from the raw logits (no penalty, temperature or filters).
    """
    raw = logits.float()
    log_z = torch.logsumexp(raw, dim=-1)  # [N]
    index = torch.tensor(list(targets), dtype=torch.long, device=raw.device)
    chosen = (raw.gather(1, index[:, None]).squeeze(1) - log_z).tolist()
    alternatives = [_top_logprobs(raw[i] - log_z[i], top) if top > 0 else [] for i in range(raw.shape[0])]
    return chosen, alternatives


def _top_logprobs(row: torch.Tensor, n: int) -> list[tuple[int, float]]:
    """The n best (token, logprob) of one row, descending, equal values ordered by token id.

    ``topk`` alone leaves ties in an unspecified order, so every token tied with the n-th value is gathered
    (in id order) and a stable sort settles the order.
    """
    n = min(n, row.shape[-1])
    threshold = torch.topk(row, n).values[-1]
    candidates = torch.nonzero(row >= threshold).squeeze(1)  # ascending ids
    values = row[candidates]
    order = torch.sort(values, descending=True, stable=True).indices[:n]
    return list(zip(candidates[order].tolist(), values[order].tolist(), strict=True))
