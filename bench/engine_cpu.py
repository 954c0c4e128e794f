"""CPU throughput: the engine on 32 mixed-adapter requests vs PEFT ``generate(adapter_names=...)``, and the
engine with vs without LoRA.

Question answered: what does multi-LoRA cost in our runtime, and how does continuous batching with rank-exact
LoRA compare with the reference implementation on the same machine? Every number is measured in this run.

    .venv/bin/python bench/engine_cpu.py [--requests 32] [--new-tokens 32] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

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


def _engine_run(core: EngineCore, prompts: list[list[int]], keys: list[str | None], new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    for i, (prompt, key) in enumerate(zip(prompts, keys, strict=True)):
        core.add_request(GenerationRequest(f"r{i}", prompt, params, adapter_key=key))
    start = time.perf_counter()
    generated = 0
    while core.has_work():
        generated += sum(len(e.token_ids) for e in core.step() if hasattr(e, "token_ids"))
    return generated / (time.perf_counter() - start)


def _peft_run(
    model_dir: Path, adapters: dict[str, Path], prompts: list[list[int]], names: list[str], new: int
) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    first, *rest = adapters
    model = PeftModel.from_pretrained(base, str(adapters[first]), adapter_name=first)
    for name in rest:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(  # type: ignore[no-untyped-call]
            ids, adapter_names=names, do_sample=False, max_new_tokens=new, min_new_tokens=new
        )
    elapsed = time.perf_counter() - start
    return float((out.shape[1] - ids.shape[1]) * ids.shape[0] / elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dims = dict(
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 2,
            num_hidden_layers=args.layers,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=512,
        )
        model_dir = build_model(root / "model", arch="llama", **dims)
        adapters = {name: build_adapter(model_dir, root / name, spec) for name, spec in ZOO.items()}
        names = [list(adapters)[i % len(adapters)] for i in range(args.requests)]
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, 320, (args.requests, args.prompt_len), generator=g).tolist()

        def core() -> EngineCore:
            c = EngineCore.load(
                EngineConfig(
                    model_dir=model_dir, dtype="float32", max_adapters_per_step=8, kv_cache_blocks=512, max_lora_rank=64
                )
            )
            for name, path in adapters.items():
                c.host.add(name, HostAdapter.from_peft_dir(path, c.loaded.spec, 64))
            return c

        _engine_run(core(), prompts[:2], [None, names[0]], 2)  # warm-up
        lora_tps = _engine_run(core(), prompts, list(names), args.new_tokens)
        base_tps = _engine_run(core(), prompts, [None] * args.requests, args.new_tokens)
        peft_tps = _peft_run(model_dir, adapters, prompts, names, args.new_tokens)

    print(
        f"model: llama hidden={args.hidden} layers={args.layers}; {args.requests} requests x "
        f"{args.new_tokens} new tokens, {len(adapters)} adapters (ranks 4..64), threads={torch.get_num_threads()}"
    )
    print(f"engine, mixed LoRA : {lora_tps:8.1f} tok/s")
    print(f"engine, base only  : {base_tps:8.1f} tok/s   (LoRA / base = {lora_tps / base_tps:.2f})")
    print(f"PEFT adapter_names : {peft_tps:8.1f} tok/s   (engine / PEFT = {lora_tps / peft_tps:.2f})")


if __name__ == "__main__":
    main()
