"""The random Llama models the benchmarks build (one place for their shapes, so the scripts stay comparable).

Two shapes:
  * ``small_llama``: the serving benchmarks' model (serve, fleet, http_vs_grpc, fairness, lora_family):
    intermediate 2 x hidden, head_dim 64 (at least 2 heads), kv heads = heads / 2.
  * ``llama_shaped``: the step-cost benchmarks' model (engine_cpu, lora_cpu, quant): intermediate 8/3 x hidden
    rounded up to 64 like a real Llama, head_dim 64 with at least 8 heads, kv heads = heads / 2, 512 positions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def small_llama(out: Path, hidden: int, layers: int, max_positions: int = 256, **extra: Any) -> Path:
    from loraplex.services.demo_assets import build_model  # torch: only when a model is built, not for --help

    heads = max(2, hidden // 64)
    return build_model(
        out,
        "llama",
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        **extra,
    )


def llama_shaped_dims(hidden: int, layers: int, vocab: int) -> dict[str, int]:
    heads = max(8, hidden // 64)
    return dict(
        hidden_size=hidden,
        intermediate_size=-(-hidden * 8 // 3 // 64) * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=512,
        vocab_size=vocab,
    )


def llama_shaped(out: Path, hidden: int, layers: int, vocab: int) -> Path:
    from loraplex.services.demo_assets import build_model

    return build_model(out, "llama", **llama_shaped_dims(hidden, layers, vocab))
