"""Shared helpers for engine tests: build a core, drive it step by step, load PEFT oracles."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.config import EngineConfig
from loraplex.engine.core import EngineCore
from loraplex.engine.request import Delta, FinishReason, GenerationRequest
from loraplex.engine.sampling import SamplingParams

BASE = "__base__"


def make_core(model_dir: Path, adapters: Mapping[str, Path] | None = None, **overrides: Any) -> EngineCore:
    """A CPU fp32 core with small paged blocks, every given adapter in the host tier under its name."""
    kwargs: dict[str, Any] = dict(
        model_dir=model_dir,
        dtype="float32",
        block_size=4,
        kv_cache_blocks=256,
        max_adapters_per_step=8,
        max_lora_rank=64,
    )
    kwargs.update(overrides)
    core = EngineCore.load(EngineConfig(**kwargs))
    for name, path in (adapters or {}).items():
        core.residency.add(name, HostAdapter.from_peft_dir(path, core.loaded.spec, 64))
    return core


def request(rid: str, prompt: list[int], adapter: str | None, **params: Any) -> GenerationRequest:
    key = None if adapter in (None, BASE) else adapter
    return GenerationRequest(rid, prompt, SamplingParams(**params), adapter_key=key)


def drive(
    core: EngineCore,
    requests: list[GenerationRequest],
    arrive_at: Mapping[str, int] | None = None,
    max_steps: int = 500,
    record_logits: bool = False,
) -> tuple[dict[str, list[Delta]], list[dict[str, torch.Tensor]]]:
    """Run steps until every request finished; request r joins before step ``arrive_at[r]`` (default 0).

    Returns each request's deltas and, when asked, per step the logits row of every sampled request.
    """
    arrive_at = arrive_at or {}
    pending = sorted(requests, key=lambda r: arrive_at.get(r.request_id, 0))
    deltas: dict[str, list[Delta]] = {r.request_id: [] for r in requests}
    logits: list[dict[str, torch.Tensor]] = []
    step = 0
    while pending or core.has_work():
        while pending and arrive_at.get(pending[0].request_id, 0) <= step:
            core.add_request(pending.pop(0))
        for event in [*core.expire(), *core.step()]:
            assert isinstance(event, Delta), event
            deltas.setdefault(event.request_id, []).append(event)
        if record_logits and core.last_step.logits is not None:
            rows = core.last_step.logits
            logits.append({rid: rows[i].clone() for i, rid in enumerate(core.last_step.request_ids)})
            core.last_step.logits = None
        step += 1
        assert step < max_steps, "engine did not finish"
    return deltas, logits


def tokens(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def finish(deltas: list[Delta]) -> FinishReason | None:
    return deltas[-1].finish_reason if deltas else None


def prompts(count: int, length: int, vocab: int = 320, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=g).tolist()


def peft_model(model_dir: Path, adapters: Mapping[str, Path]) -> Any:
    """A transformers model with every adapter loaded under its name (the oracle)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    return model


def until_eos(ids: list[int], eos: int) -> list[int]:
    """HF pads finished rows; keep tokens up to and including the first EOS."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def per_row_oracle(
    model: Any, rows: list[tuple[str, list[int]]], new_tokens: int, eos: int
) -> list[tuple[list[int], list[torch.Tensor]]]:
    """Per row, one at a time with its adapter set (``BASE``: adapters disabled): PEFT's greedy tokens and its
    logits at the prefill and each decode step. For adapters PEFT's mixed-batch ``generate`` does not take (DoRA)."""
    out: list[tuple[list[int], list[torch.Tensor]]] = []
    for name, prompt in rows:
        if name != BASE:
            model.set_adapter(name)
        with torch.no_grad(), model.disable_adapter() if name == BASE else contextlib.nullcontext():
            result = model.generate(
                torch.tensor([prompt]),
                do_sample=False,
                max_new_tokens=new_tokens,
                output_logits=True,
                return_dict_in_generate=True,
            )
        ids = until_eos(result.sequences[0, len(prompt) :].tolist(), eos)
        out.append((ids, [step[0].float() for step in result.logits]))
    return out


def assert_mixed_batch_matches(
    core: EngineCore,
    oracle: Any,
    batch: list[list[int]],
    names: list[str],
    new_tokens: int,
    eos: int = 1,
    min_compared: int = 2,
) -> None:
    """One engine batch of ``names`` (``BASE`` = no adapter) against PEFT's mixed-batch ``generate``.

    Greedy tokens equal row by row; fp32 logits within 1e-4 at the prefill (step 0) and at every decode step k
    (PEFT's ``out.logits[k]``) while the row is running; at least ``min_compared`` decode rows per batch row.
    """
    input_ids = torch.tensor(batch)
    prompt_len = input_ids.shape[1]
    with torch.no_grad():
        prefill = oracle(input_ids, adapter_names=names).logits[:, -1].float()
        out = oracle.generate(
            input_ids,
            adapter_names=names,
            do_sample=False,
            max_new_tokens=new_tokens,
            output_logits=True,
            return_dict_in_generate=True,
        )
    want = [until_eos(row[prompt_len:].tolist(), eos) for row in out.sequences]
    reqs = [
        request(f"r{i}", p, n, max_new_tokens=new_tokens) for i, (p, n) in enumerate(zip(batch, names, strict=True))
    ]
    deltas, logits = drive(core, reqs, record_logits=True)
    for i, name in enumerate(names):
        assert tokens(deltas[f"r{i}"]) == want[i], f"row {i} adapter {name}"
        torch.testing.assert_close(logits[0][f"r{i}"], prefill[i], atol=1e-4, rtol=0)
    compared = 0
    for k in range(1, new_tokens):
        for i in range(len(names)):
            row = logits[k].get(f"r{i}") if k < len(logits) else None
            if row is None:
                continue  # finished (EOS) before this step
            torch.testing.assert_close(row, out.logits[k][i].float(), atol=1e-4, rtol=0)
            compared += 1
    assert compared >= len(names) * min_compared
