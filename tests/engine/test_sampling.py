"""Sampling: semantics against Hugging Face's own processors, seed batch-invariance, statistics, checks."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from loraplex.engine.sampling import (
    MAX_NEW_TOKENS_CAP,
    SampleOutput,
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    make_generator,
    mask_tokens,
    sample,
)
from loraplex.registry.errors import InvalidArgument

V = 64
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def _logits(batch: int, vocab: int = V, seed: int = 0, scale: float = 3.0, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, vocab, generator=g) * scale).to(device)


def _run(logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]] | None = None) -> SampleOutput:
    gens = [make_generator(p, logits.device) for p in params]
    return sample(logits, params, gens, histories or [[] for _ in params])


def _hf_filtered(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The Hugging Face warper chain, in ``generate``'s order, as the oracle for which tokens survive."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    ids = cast(torch.LongTensor, torch.zeros(logits.shape[0], 1, dtype=torch.long))
    x: torch.Tensor = TemperatureLogitsWarper(p.temperature)(ids, logits.clone())
    if p.top_k:
        x = TopKLogitsWarper(p.top_k)(ids, x)
    if p.top_p < 1.0:
        x = TopPLogitsWarper(p.top_p)(ids, x)
    if p.min_p > 0.0:
        x = MinPLogitsWarper(p.min_p)(ids, x)
    return x


def _filtered(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    b = logits.shape[0]
    out: torch.Tensor = filter_logits(
        logits / p.temperature,
        torch.full((b,), p.top_k, dtype=torch.long),
        torch.full((b,), p.top_p),
        torch.full((b,), p.min_p),
    )
    return out


# ---------------------------------------------------------------------------------------------- greedy family


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax(device: str) -> None:
    logits = _logits(6, device=device)
    out = _run(logits, [SamplingParams()] * 6)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert SamplingParams().is_greedy and make_generator(SamplingParams(), "cpu") is None


def test_low_temperature_converges_to_greedy() -> None:
    logits = _logits(8, seed=1)
    best = logits.argmax(-1)
    logits[torch.arange(8), best] += 1.0  # a clear winner, so T=1e-3 leaves the others ~e^-1000 behind
    params = [SamplingParams(temperature=1e-3, seed=i) for i in range(8)]
    gens = [make_generator(p, "cpu") for p in params]
    for _ in range(20):
        assert sample(logits, params, gens, [[]] * 8).token_ids == best.tolist()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.5, top_k=1),
        SamplingParams(temperature=1.5, top_p=1e-6),
        SamplingParams(temperature=1.5, min_p=1.0),
    ],
    ids=["top_k=1", "top_p=tiny", "min_p=1"],
)
def test_degenerate_filters_equal_greedy(params: SamplingParams) -> None:
    logits = _logits(8, seed=2)
    batch = [SamplingParams(**{**params.__dict__, "seed": i}) for i in range(8)]
    gens = [make_generator(p, "cpu") for p in batch]
    for _ in range(10):
        assert sample(logits, batch, gens, [[]] * 8).token_ids == logits.argmax(-1).tolist()


# ---------------------------------------------------------------------------------------------- filters vs HF


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.1),
        SamplingParams(temperature=0.9, top_k=20, top_p=0.7, min_p=0.05),
        SamplingParams(temperature=2.0, top_k=V + 10),
    ],
)
def test_filters_keep_the_same_tokens_as_hf_warpers(params: SamplingParams) -> None:
    for seed in range(5):
        logits = _logits(4, seed=seed)
        ours = torch.isfinite(_filtered(logits, params))
        theirs = torch.isfinite(_hf_filtered(logits, params))
        assert torch.equal(ours, theirs)


def test_top_k_fast_path_equals_full_sort() -> None:
    logits = _logits(6, seed=13)
    logits[0, :4] = logits[0].max() + 1.0  # a tie straddling the k boundary
    top_k = torch.tensor([3, 1, 7, 20, V, 5])
    top_p, min_p = torch.ones(6), torch.tensor([0.0, 0.0, 0.2, 0.0, 0.01, 0.0])
    full = filter_logits(logits, top_k, top_p, min_p)
    fast = filter_logits(logits, top_k, top_p, min_p, any_top_p=False, max_top_k=V)
    assert torch.equal(full, fast)
    small_k = top_k.clamp(max=20)
    assert torch.equal(
        filter_logits(logits, small_k, top_p, min_p),
        filter_logits(logits, small_k, top_p, min_p, any_top_p=False, max_top_k=20),
    )
    assert int(torch.isfinite(full[0]).sum()) == 4


def test_top_k_keeps_ties_at_the_boundary() -> None:
    logits = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0]])
    kept = torch.isfinite(_filtered(logits, SamplingParams(temperature=1.0, top_k=2)))
    assert kept.tolist() == [[True, True, True, True, False]]


def test_mixed_parameters_in_one_batch_filter_per_row() -> None:
    logits = _logits(3, seed=7)
    params = [
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(temperature=1.0),
    ]
    out = filter_logits(
        logits,
        torch.tensor([p.top_k for p in params]),
        torch.tensor([p.top_p for p in params]),
        torch.tensor([p.min_p for p in params]),
    )
    for i, p in enumerate(params):
        assert torch.equal(torch.isfinite(out[i]), torch.isfinite(_hf_filtered(logits[i : i + 1], p)[0]))
    assert bool(torch.isfinite(out[2]).all())  # top_p == 1 never cuts, whatever the float rounding


# ------------------------------------------------------------------------------------ repetition penalty


def test_repetition_penalty_matches_hf_processor() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = _logits(4, seed=3)
    g = torch.Generator().manual_seed(3)
    histories = [torch.randint(0, V, (n,), generator=g).tolist() for n in (1, 7, 30, 12)]
    for penalty in (0.5, 1.3, 2.0):
        ours = apply_repetition_penalty(logits, [penalty] * 4, histories)
        for i, h in enumerate(histories):
            ids = torch.tensor([h])
            theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[i : i + 1].clone())
            torch.testing.assert_close(ours[i : i + 1], theirs, rtol=0, atol=0)


def test_repetition_penalty_only_touches_rows_that_ask() -> None:
    logits = _logits(3, seed=4)
    out = apply_repetition_penalty(logits, [1.0, 1.5, 1.5], [[1, 2, 3], [], [5]])
    assert torch.equal(out[0], logits[0]) and torch.equal(out[1], logits[1])
    assert not torch.equal(out[2], logits[2])
    assert torch.equal(out[2, :5], logits[2, :5])


def test_greedy_with_repetition_penalty_equals_hf_generate(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tests.fixtures.hf import build_model

    model: Any = AutoModelForCausalLM.from_pretrained(str(build_model(tmp_path / "m", "llama", seed=11)))
    model.eval()
    prompt = torch.tensor([[5, 17, 42, 17, 99, 5, 200]])
    steps = 24
    paths: dict[float, list[int]] = {}
    for penalty in (1.0, 1.8):
        with torch.no_grad():
            expected = model.generate(
                prompt,
                do_sample=False,
                repetition_penalty=penalty,
                max_new_tokens=steps,
                min_new_tokens=steps,
                pad_token_id=2,
            )[0, prompt.shape[1] :].tolist()
            ids = prompt[0].tolist()
            params = SamplingParams(repetition_penalty=penalty)
            for _ in range(steps):
                logits = model(torch.tensor([ids])).logits[:, -1, :]
                # min_new_tokens: the caller bans EOS until enough tokens exist, exactly as HF does here.
                ids.append(sample(logits, [params], [None], [ids], banned=[[1]]).token_ids[0])
        assert ids[prompt.shape[1] :] == expected
        paths[penalty] = expected
    assert paths[1.0] != paths[1.8]  # not vacuous: the penalty changed the greedy path


# ---------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "target",
    [
        SamplingParams(temperature=0.9, top_k=40, top_p=0.95, min_p=0.01, repetition_penalty=1.2, seed=1234),
        # Alone this row takes the topk fast path; next to top_p companions the full sort: same tokens.
        SamplingParams(temperature=1.1, top_k=30, seed=99),
        SamplingParams(temperature=0.7, seed=5),
    ],
    ids=["all-filters", "top_k-only", "plain"],
)
def test_seeded_rows_are_batch_invariant(device: str, target: SamplingParams) -> None:
    steps = 6
    vocab = 257
    all_logits = [_logits(5, vocab=vocab, seed=100 + s, device=device) for s in range(steps)]

    def run(position: int, batch: int, companions_seed: int) -> list[int]:
        rng = torch.Generator().manual_seed(companions_seed)
        params: list[SamplingParams] = []
        for i in range(batch):
            if i == position:
                params.append(target)
                continue
            params.append(
                SamplingParams(
                    temperature=float(torch.rand(1, generator=rng)) * 2,
                    top_k=int(torch.randint(0, 10, (1,), generator=rng)),
                    top_p=1.0 if i % 2 else 0.5 + float(torch.rand(1, generator=rng)) / 2,
                    seed=None if i % 2 else int(torch.randint(0, 1000, (1,), generator=rng)),
                )
            )
        gens = [make_generator(p, device) for p in params]
        histories: list[list[int]] = [[3, 4, 5] for _ in params]
        tokens = []
        for s in range(steps):
            logits = all_logits[s][:batch].clone()
            # Every position sees the same target logits, the companions see other rows' logits.
            logits[position] = all_logits[s][0]
            out = sample(logits, params, gens, histories)
            for h, t in zip(histories, out.token_ids, strict=True):
                h.append(t)
            tokens.append(out.token_ids[position])
        return tokens

    alone = run(0, 1, 0)
    assert len(set(alone)) > 1  # sampling really happened
    for position, companions_seed in [(0, 1), (3, 2), (4, 3), (2, 4)]:
        assert run(position, 5, companions_seed) == alone


def test_unseeded_rows_differ_across_runs() -> None:
    logits = torch.zeros(1, 1000)
    params = [SamplingParams(temperature=1.0)]
    runs = []
    for _ in range(2):
        gens = [make_generator(params[0], "cpu")]
        runs.append([sample(logits, params, gens, [[]]).token_ids[0] for _ in range(8)])
    assert runs[0] != runs[1]


def test_same_seed_same_stream_and_generator_required() -> None:
    logits = _logits(1, seed=9)
    p = SamplingParams(temperature=1.0, seed=7)
    a = [make_generator(p, "cpu") for _ in range(2)]
    seq = [[sample(logits, [p], [g], [[]]).token_ids[0] for _ in range(10)] for g in a]
    assert seq[0] == seq[1]
    with pytest.raises(ValueError, match="generator"):
        sample(logits, [p], [None], [[]])
    with pytest.raises(ValueError, match="one entry per"):
        sample(logits, [p, p], [None], [[]])


# ---------------------------------------------------------------------------------------------- statistics


# 99.9th percentiles of chi-square by degrees of freedom; the seeds are fixed, so the test cannot flake.
CHI2_999 = {2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "p",
    [
        SamplingParams(temperature=0.8, top_k=6, top_p=0.9),
        SamplingParams(temperature=1.3, min_p=0.05),
        SamplingParams(temperature=1.3),
    ],
    ids=["top_k+top_p", "min_p", "plain"],
)
def test_sampled_frequencies_follow_the_filtered_softmax(device: str, p: SamplingParams) -> None:
    logits = torch.tensor([[2.0, 1.5, 1.2, 1.0, 0.3, 0.2, -1.0, -2.0]])
    expected = torch.softmax(_hf_filtered(logits, p), dim=-1)[0]
    support = {i for i, v in enumerate(expected.tolist()) if v > 0}
    assert len(support) > 2

    rows = 500
    params = [SamplingParams(**{**p.__dict__, "seed": 10_000 + i}) for i in range(rows)]
    gens = [make_generator(q, device) for q in params]
    batch = logits.expand(rows, -1).contiguous().to(device)
    counts: Counter[int] = Counter()
    for _ in range(40):
        counts.update(sample(batch, params, gens, [[]] * rows).token_ids)
    n = rows * 40
    assert set(counts) <= support
    chi2 = sum((counts[t] - n * expected[t].item()) ** 2 / (n * expected[t].item()) for t in support)
    assert chi2 < CHI2_999[len(support) - 1], (chi2, counts, expected)


def test_tiny_temperatures_are_greedy_not_nan() -> None:
    logits = _logits(4, seed=12, scale=50.0)
    p = SamplingParams(temperature=1e-30)
    p.validate(V)
    assert p.is_greedy and make_generator(p, "cpu") is None
    assert _run(logits, [p] * 4).token_ids == logits.argmax(-1).tolist()


def test_min_p_never_samples_below_the_floor() -> None:
    logits = _logits(1, seed=5, scale=1.0)
    p = SamplingParams(temperature=1.0, min_p=0.5, seed=3)
    probs = torch.softmax(logits[0], -1)
    allowed = set(torch.nonzero(probs >= 0.5 * probs.max()).squeeze(1).tolist())
    g = make_generator(p, "cpu")
    seen = {sample(logits, [p], [g], [[]]).token_ids[0] for _ in range(300)}
    assert seen <= allowed and len(seen) > 1


# -------------------------------------------------------------------------------------- logprobs + masks


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_raw_log_softmax(device: str) -> None:
    logits = _logits(3, seed=6, device=device)
    params = [
        SamplingParams(logprobs=True, top_logprobs=5, repetition_penalty=2.0),
        SamplingParams(temperature=0.5, top_k=3, seed=1, logprobs=True, top_logprobs=20),
        SamplingParams(temperature=1.0, seed=2),
    ]
    out = _run(logits, params, [[0, 1, 2], [], []])
    ref = torch.log_softmax(logits, -1)
    for i, t in enumerate(out.token_ids):
        assert math.isclose(out.logprobs[i], ref[i, t].item(), rel_tol=1e-6)
    for i, n in [(0, 5), (1, 20)]:
        values, ids = torch.sort(ref[i], descending=True)
        assert [t for t, _ in out.top_logprobs[i]] == ids[:n].tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in out.top_logprobs[i]]), values[:n].cpu())
    assert out.top_logprobs[2] == []


def test_top_logprobs_ties_are_ordered_by_token_id() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 1.0, 1.0, 2.0, -1.0]])
    out = _run(logits, [SamplingParams(top_logprobs=5)])
    assert [t for t, _ in out.top_logprobs[0]] == [1, 3, 6, 2, 4]
    assert out.token_ids == [1]


def test_banned_tokens_are_never_chosen_but_logprobs_stay_raw() -> None:
    logits = _logits(2, seed=8)
    best = logits.argmax(-1).tolist()
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1, seed=0)]
    gens = [make_generator(p, "cpu") for p in params]
    out = sample(logits, params, gens, [[], []], banned=[[best[0]], [best[1]]])
    assert out.token_ids[0] != best[0] and out.token_ids[1] != best[1]
    ref = torch.log_softmax(logits, -1)
    assert math.isclose(out.logprobs[0], ref[0, out.token_ids[0]].item(), rel_tol=1e-6)
    row = logits[0].clone()
    mask_tokens(row, [best[0], 3])
    assert row[best[0]] == float("-inf") and row[3] == float("-inf")
    assert int(row.argmax()) == out.token_ids[0] or out.token_ids[0] == 3


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_k", -1),
        ("top_k", 1.5),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", float("nan")),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("max_new_tokens", 0),
        ("max_new_tokens", MAX_NEW_TOKENS_CAP + 1),
        ("min_new_tokens", -1),
        ("min_new_tokens", 17),
        ("top_logprobs", -1),
        ("top_logprobs", 21),
        ("stop", ("",)),
        ("stop", tuple(str(i) for i in range(17))),
        ("stop", ("x" * 257,)),
        ("stop_token_ids", (V,)),
        ("stop_token_ids", (-1,)),
        ("seed", -1),
        ("seed", 1 << 64),
        ("time_limit_s", 0.0),
        ("time_limit_s", -3.0),
    ],
)
def test_validate_rejects_and_names_the_field(field: str, value: object) -> None:
    params = SamplingParams(**{field: value})
    with pytest.raises(InvalidArgument) as err:
        params.validate(V)
    name = "max_new_tokens" if (field, value) == ("min_new_tokens", 17) else field
    assert name in err.value.message
    assert err.value.reason == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(
            temperature=1.0,
            top_k=V,
            top_p=1.0,
            min_p=1.0,
            repetition_penalty=0.5,
            seed=(1 << 64) - 1,
            max_new_tokens=MAX_NEW_TOKENS_CAP,
            min_new_tokens=MAX_NEW_TOKENS_CAP,
            stop=tuple("x" * 256 for _ in range(16)),
            stop_token_ids=(0, V - 1),
            top_logprobs=20,
            time_limit_s=0.5,
        ),
        SamplingParams(seed=0, top_k=10_000),
    ],
)
def test_validate_accepts_edges(params: SamplingParams) -> None:
    params.validate(V)


def test_max_seed_is_usable() -> None:
    p = SamplingParams(temperature=1.0, seed=(1 << 64) - 1)
    assert len(_run(_logits(1), [p]).token_ids) == 1


def test_plain_greedy_fast_path_and_skipped_logprobs() -> None:
    """All-greedy batches with nothing to mask take one argmax: same tokens as the general path (which a banned
    token forces), first index on ties; ``need_logprobs=False`` leaves logprobs NaN but keeps top_logprobs."""
    logits = _logits(4, seed=9)
    logits[2, 5] = logits[2, 7] = logits[2].max() + 1.0  # a tie: the lower id wins, as in argmax
    params = [SamplingParams(), SamplingParams(), SamplingParams(top_logprobs=3), SamplingParams()]
    fast = sample(logits, params, [None] * 4, [[]] * 4, need_logprobs=False)
    general = sample(logits, params, [None] * 4, [[]] * 4, banned=[[], [], [], [int(logits[3].argmin())]])
    assert fast.token_ids == general.token_ids == logits.argmax(-1).tolist()
    assert fast.token_ids[2] == 5
    assert all(math.isnan(v) for v in fast.logprobs)
    assert fast.top_logprobs[2] == general.top_logprobs[2] and len(fast.top_logprobs[2]) == 3
    assert fast.top_logprobs[0] == []
