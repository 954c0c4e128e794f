"""CPU throughput: the engine on mixed-adapter requests vs PEFT ``generate(adapter_names=...)``, and the engine
with vs without LoRA.

Question answered: what does multi-LoRA cost in our runtime, and how does continuous batching with rank-exact
LoRA compare with the reference implementation on the same machine? Every number is measured in this run.

Setup (the same for every contender, so the ratios are fair):
  * one random Llama-family model (fp32): ``--hidden``, ``--layers``, ``--vocab`` (32000 by default, so the
    lm_head costs what it costs in a real small model), intermediate = 8/3 x hidden (rounded to 64), head_dim 64
    (8 heads below hidden 512), kv heads = heads / 2; a word-level tokenizer covering the whole vocabulary (so
    detokenizing costs what it costs for real, not an unknown-id no-op); 8 real PEFT adapters (ranks 4..64,
    mixed target sets) saved to disk;
  * ``--requests`` prompts of random tokens, each of a length drawn uniformly from ``--prompt-len MIN:MAX``,
    adapter i % 8 for request i;
  * greedy decoding; request i generates exactly n_i tokens, n_i drawn uniformly from ``--new-tokens MIN:MAX``
    (EOS ignored / ``min_new_tokens``); a single number means every request uses it (round 1's uniform setup);
  * the same torch thread count (``--threads``) for everything;
  * each contender runs ``--repeats`` times, interleaved, on a fresh engine (adapters are loaded into the device
    pool inside the timed region, as a cold step would), and the best run is reported.
Contenders:
  * engine, mixed LoRA: all requests submitted at once, stepped to completion (continuous batching: a request
    leaves the batch when its n_i tokens are out, and its KV blocks are freed);
  * engine, base only: the same requests with no adapter (LoRA overhead = 1 - mixed / base);
  * PEFT batched (headline baseline): one ``PeftModel.generate`` over the left-padded batch with
    ``adapter_names`` and ``max_new_tokens = min_new_tokens = max n_i``. ``generate`` takes one length for the
    whole batch, so every row runs until the longest request is done; that is the real-world cost of padded
    batching. Only the useful tokens (sum of n_i, the same count the engine produces) are credited;
  * PEFT sequential (``--sequential``): one ``generate`` per request (no padding, exactly n_i tokens), its adapter
    chosen with ``set_adapter``.
Two throughputs per contender: wall-clock tok/s, and tok per CPU-second (``time.process_time``). On a shared
machine other processes stretch wall time; CPU time is far less sensitive, and with ``--threads 1`` it equals wall
time on an idle machine. ``--breakdown`` adds where one mixed-LoRA run spends its time, phase by phase.

    .venv/bin/python bench/engine_cpu.py [--requests 32] [--prompt-len 8:64] [--new-tokens 8:64] [--hidden 256]
                                         [--layers 4] [--vocab 32000] [--threads 1] [--repeats 3]
                                         [--sequential] [--breakdown]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_models import llama_shaped_dims

from loraplex.engine.adapters.host import HostAdapter
from loraplex.engine.config import EngineConfig
from loraplex.engine.core import EngineCore
from loraplex.engine.request import GenerationRequest
from loraplex.engine.sampling import SamplingParams
from loraplex.services.demo_assets import ALL_LINEAR, AdapterSpec, build_adapter, build_model

# Eight adapters, ranks 4..64, mixed target sets (the test zoo's shape, without lm_head/embedding LoRA, which
# PEFT's mixed-batch path handles per adapter anyway).
ZOO: dict[str, AdapterSpec] = {
    f"a{i}-r{r}": AdapterSpec(r=r, lora_alpha=2.0 * r, target_modules=targets, seed=i)
    for i, (r, targets) in enumerate(
        [
            (4, ("q_proj", "v_proj")),
            (8, tuple(ALL_LINEAR)),
            (16, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (32, ("gate_proj", "up_proj", "down_proj")),
            (64, tuple(ALL_LINEAR)),
            (8, tuple(ALL_LINEAR)),
            (12, ("o_proj", "down_proj")),
            (16, tuple(ALL_LINEAR)),
        ]
    )
}


@dataclass(frozen=True)
class Rate:
    """Tokens per wall second and per CPU second of one run."""

    wall: float
    cpu: float

    @staticmethod
    def best(rates: list[Rate]) -> Rate:
        return Rate(max(r.wall for r in rates), max(r.cpu for r in rates))


@contextmanager
def _clock(tokens: Callable[[], int], into: list[Rate]) -> Iterator[None]:
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    n = tokens()
    into.append(Rate(n / (time.perf_counter() - wall), n / max(time.process_time() - cpu, 1e-9)))


@dataclass
class Workload:
    model_dir: Path
    adapters: dict[str, Path]
    prompts: list[list[int]]
    names: list[str]
    new_tokens: list[int]  # n_i per request
    pad_id: int = 2

    @property
    def useful_tokens(self) -> int:
        return sum(self.new_tokens)

    def core(self) -> EngineCore:
        core = EngineCore.load(
            EngineConfig(
                model_dir=self.model_dir,
                dtype="float32",
                max_adapters_per_step=len(self.adapters),
                kv_cache_blocks=1024,
                max_lora_rank=64,
            )
        )
        for name, path in self.adapters.items():
            core.residency.add(name, HostAdapter.from_peft_dir(path, core.loaded.spec, 64))
        return core

    def engine(self, lora: bool, into: list[Rate], core: EngineCore | None = None) -> None:
        core = core or self.core()
        for i, (prompt, n) in enumerate(zip(self.prompts, self.new_tokens, strict=True)):
            params = SamplingParams(max_new_tokens=n, ignore_eos=True)  # greedy by default
            key = self.names[i] if lora else None
            core.add_request(GenerationRequest(f"r{i}", prompt, params, adapter_key=key))
        generated = 0

        def count() -> int:
            return generated

        with _clock(count, into):
            while core.has_work():
                generated += sum(len(e.token_ids) for e in core.step() if hasattr(e, "token_ids"))

    def peft_model(self) -> Any:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32)
        first, *rest = self.adapters
        model = PeftModel.from_pretrained(base, str(self.adapters[first]), adapter_name=first)
        for name in rest:
            model.load_adapter(str(self.adapters[name]), adapter_name=name)
        return model.eval()

    def peft_batched(self, model: Any, into: list[Rate]) -> None:
        """One padded ``generate``: left padding + attention mask, every row runs max n_i tokens."""
        width = max(len(p) for p in self.prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in self.prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in self.prompts])
        longest = max(self.new_tokens)
        out: list[torch.Tensor] = []
        with _clock(lambda: self.useful_tokens, into), torch.no_grad():
            out.append(
                model.generate(
                    ids,
                    attention_mask=mask,
                    adapter_names=self.names,
                    do_sample=False,
                    max_new_tokens=longest,
                    min_new_tokens=longest,
                    pad_token_id=self.pad_id,
                )
            )
        if out[0].shape[1] != width + longest:
            raise RuntimeError("PEFT generate stopped early; the comparison would not be fair")

    def peft_sequential(self, model: Any, into: list[Rate]) -> None:
        generated = 0

        def count() -> int:
            return generated

        with _clock(count, into), torch.no_grad():
            for prompt, name, n in zip(self.prompts, self.names, self.new_tokens, strict=True):
                model.set_adapter(name)
                ids = torch.tensor([prompt])
                out = model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=self.pad_id)
                generated += int(out.shape[1] - ids.shape[1])


def word_tokenizer(model_dir: Path, vocab: int) -> None:
    """Replace the model's tokenizer by a word-level one with one word per id (w0 .. w{vocab-1}).

    Why: the tiny BPE of the test fixtures knows a few hundred ids; decoding the others yields no text, which
    would make detokenization an unrealistic no-op (and keep growing its window). Special ids 0..2 stay
    ``<s>``, ``</s>``, ``<pad>`` so the model config's BOS/EOS/PAD still mean what they say.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models

    specials = ["<s>", "</s>", "<pad>"]
    words = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(len(specials), vocab)])}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.save(str(model_dir / "tokenizer.json"))


def _span(text: str) -> tuple[int, int]:
    """``"8:64"`` -> (8, 64); ``"24"`` -> (24, 24)."""
    low, _, high = text.partition(":")
    lo, hi = int(low), int(high or low)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def breakdown(work: Workload) -> list[tuple[str, float]]:
    """Seconds per phase of one mixed-LoRA run, by wrapping the engine's phase functions with timers.

    Nested phases are exclusive: "base matmuls" excludes the LoRA inside ``LoRALinear``; "other model ops" is the
    forward minus its timed parts (embedding, norms, rotary, activation, residual adds).
    """
    from loraplex.engine import context as context_mod
    from loraplex.engine import core as core_mod
    from loraplex.engine import output as output_mod
    from loraplex.engine import scheduler as sched_mod
    from loraplex.engine.model import attention as attn_mod
    from loraplex.engine.model import layers as layers_mod
    from loraplex.engine.model import llama as llama_mod
    from loraplex.kernels import lora as lora_mod

    totals: dict[str, float] = {}
    stack: list[float] = []  # child time to subtract from the enclosing timer

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            stack.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                children = stack.pop()
                totals[name] = totals.get(name, 0.0) + elapsed - children
                if stack:
                    stack[-1] += elapsed

        return wrapper

    patches: list[tuple[Any, str, Any]] = [
        (sched_mod.Scheduler, "schedule", "schedule (Python)"),
        (sched_mod.Scheduler, "postprocess", "postprocess (Python)"),
        (output_mod.OutputState, "on_token", "detokenize + stops"),
        (context_mod.ContextBuilder, "build", "context build (incl. LoRA prepare)"),
        (llama_mod.CausalLM, "forward", "other model ops"),
        (layers_mod.Linear, "forward", "base matmuls"),
        (layers_mod.LMHead, "forward", "lm_head"),
        (lora_mod.TorchLoRABackend, "apply", "LoRA"),
        (lora_mod.TorchLoRABackend, "embedding", "LoRA"),
        (llama_mod, "write_kv", "attention (KV write + gather + SDPA)"),
        (llama_mod, "paged_attention", "attention (KV write + gather + SDPA)"),
        (core_mod, "sample", "sampling"),
    ]
    del attn_mod  # attention functions are patched where llama.py looks them up
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    try:
        for owner, attr, name in patches:
            setattr(owner, attr, timed(name, getattr(owner, attr)))
        rates: list[Rate] = []
        start = time.perf_counter()
        work.engine(True, rates)
        total = time.perf_counter() - start
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)
    accounted = sum(totals.values())
    rows = sorted(totals.items(), key=lambda kv: -kv[1])
    rows.append(("engine loop, rest", max(0.0, total - accounted)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=_span, default=(8, 64), help="N or MIN:MAX (uniform per request)")
    parser.add_argument("--new-tokens", type=_span, default=(8, 64), help="N or MIN:MAX (uniform per request)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sequential", action="store_true", help="also time PEFT one request at a time")
    parser.add_argument("--breakdown", action="store_true", help="time the phases of one mixed-LoRA run")
    parser.add_argument("--skip-peft", action="store_true", help="engine contenders only (quick iterations)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dims = llama_shaped_dims(args.hidden, args.layers, args.vocab)
        model_dir = build_model(root / "model", arch="llama", **dims)
        word_tokenizer(model_dir, args.vocab)
        adapters = {name: build_adapter(model_dir, root / name, spec) for name, spec in ZOO.items()}
        names = [list(adapters)[i % len(adapters)] for i in range(args.requests)]
        g = torch.Generator().manual_seed(args.seed)

        def draw(span: tuple[int, int]) -> list[int]:
            return torch.randint(span[0], span[1] + 1, (args.requests,), generator=g).tolist()

        lengths, new_tokens = draw(args.prompt_len), draw(args.new_tokens)
        prompts = [torch.randint(3, args.vocab, (n,), generator=g).tolist() for n in lengths]
        work = Workload(model_dir, adapters, prompts, names, new_tokens)

        warm = Workload(model_dir, adapters, prompts[:2], names[:2], [2, 2])
        warm.engine(True, [])
        peft = None if args.skip_peft else work.peft_model()
        if peft is not None:
            warm.peft_batched(peft, [])
        lora: list[Rate] = []
        base: list[Rate] = []
        batched: list[Rate] = []
        sequential: list[Rate] = []
        for _ in range(args.repeats):
            work.engine(True, lora)
            work.engine(False, base)
            if peft is not None:
                work.peft_batched(peft, batched)
        if args.sequential and peft is not None:
            work.peft_sequential(peft, sequential)
        rows = breakdown(work) if args.breakdown else []

    lo, ba = Rate.best(lora), Rate.best(base)
    print(
        f"model: llama hidden={args.hidden} inter={dims['intermediate_size']} layers={args.layers} "
        f"heads={dims['num_attention_heads']}/{dims['num_key_value_heads']} vocab={args.vocab}; "
        f"{args.requests} requests, prompt "
        f"{min(lengths)}..{max(lengths)} (sum {sum(lengths)}), new tokens {min(new_tokens)}..{max(new_tokens)} "
        f"(sum {sum(new_tokens)}), {len(adapters)} adapters (ranks 4..64), threads={args.threads}, "
        f"best of {args.repeats}"
    )
    print(f"{'':22s} {'wall tok/s':>10s} {'CPU tok/s':>10s}")
    print(f"{'engine, mixed LoRA':22s} {lo.wall:10.1f} {lo.cpu:10.1f}")
    print(f"{'engine, base only':22s} {ba.wall:10.1f} {ba.cpu:10.1f}")
    if batched:
        pb = Rate.best(batched)
        print(f"{'PEFT batched':22s} {pb.wall:10.1f} {pb.cpu:10.1f}")
    if sequential:
        ps = Rate.best(sequential)
        print(f"{'PEFT sequential':22s} {ps.wall:10.1f} {ps.cpu:10.1f}")
    print(f"LoRA / base          : wall {lo.wall / ba.wall:.2f}  CPU {lo.cpu / ba.cpu:.2f}   (goal >= 0.77)")
    if batched:
        print(f"engine / PEFT batched: wall {lo.wall / pb.wall:.2f}  CPU {lo.cpu / pb.cpu:.2f}   (goal >= 5)")
    if sequential:
        print(f"engine / PEFT seq.   : wall {lo.wall / ps.wall:.2f}  CPU {lo.cpu / ps.cpu:.2f}")
    if rows:
        total = sum(seconds for _, seconds in rows)
        print(f"\nwhere one mixed-LoRA run spends its time ({total * 1e3:.0f} ms wall, timers included):")
        for name, seconds in rows:
            print(f"  {name:40s} {seconds * 1e3:8.1f} ms  {100 * seconds / total:5.1f}%")


if __name__ == "__main__":
    main()
