"""Tiny Hugging Face models and PEFT adapters built on CPU, for the demo and the test suite.

Why in the package: ``loraplex demo`` must make a base model and adapters locally (no model hub), and the tests
need exactly the same real formats (``save_pretrained`` output of transformers and PEFT). transformers, PEFT
and tokenizers are imported lazily: they are demo/test tools, never runtime dependencies of the services.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Shapes small enough for CPU tests, large enough for GQA (4 query heads, 2 kv heads) and several layers.
TINY_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
}
ARCHITECTURES = ("llama", "mistral", "qwen2")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_tokenizer(out_dir: Path, vocab_size: int = 320) -> Any:
    """A byte-level BPE tokenizer trained on a small synthetic corpus, saved as ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "the quick brown fox jumps over the lazy dog",
        "hello world, adapters batched in one forward pass",
        "naïve café — déjà vu 東京 🙂 emoji and accents",
        "lora low rank adaptation of large language models",
    ] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def model_config(arch: str, vocab_size: int = 320, **overrides: Any) -> Any:
    """A transformers config for one of the supported families, with tiny dimensions."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    kwargs: dict[str, Any] = dict(TINY_DIMS, vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    kwargs.update(overrides)
    if arch == "llama":
        return LlamaConfig(**kwargs)
    if arch == "mistral":
        kwargs.setdefault("sliding_window", None)
        return MistralConfig(**kwargs)
    if arch == "qwen2":
        return Qwen2Config(**kwargs)
    raise ValueError(f"unknown test architecture {arch!r}")


def build_model(
    out_dir: Path, arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> Path:
    """Save a random tiny causal LM (weights + config + tokenizer) in the Hugging Face layout."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = model_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    build_tokenizer(out_dir, vocab_size=config.vocab_size)
    return out_dir


@dataclass(frozen=True)
class AdapterSpec:
    """What a test adapter looks like; every field maps onto a ``peft.LoraConfig`` argument."""

    r: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    use_dora: bool = False  # DoRA: PEFT adds a lora_magnitude_vector per adapted module


def build_adapter(model_dir: Path, out_dir: Path, spec: AdapterSpec) -> Path:
    """Make a real PEFT LoRA adapter for the model in ``model_dir`` and save it with ``save_pretrained``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    torch.manual_seed(spec.seed)
    cfg = LoraConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,  # type: ignore[arg-type]  # PEFT accepts floats; its hint says int
        target_modules=list(spec.target_modules),
        use_rslora=spec.use_rslora,
        rank_pattern=dict(spec.rank_pattern),
        alpha_pattern=dict(spec.alpha_pattern),
        use_dora=spec.use_dora,
        init_lora_weights=False,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


# -- the demo's character-level model --------------------------------------------------------------------------

CHAR_SPECIALS = ("<s>", "</s>", "<pad>", "<unk>")  # ids 0..3: bos, eos, pad, unk
CHAR_ALPHABET = string.ascii_lowercase + string.ascii_uppercase + "="
# Big enough to learn copy/reverse/sort in a few hundred CPU steps, small enough that one step is ~50 ms.
CHAR_DIMS: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


def char_tokenizer() -> Any:
    """One token per character, BOS prepended, EOS/PAD/UNK special.

    Why characters: the demo tasks (reverse, sort, shift…) act on letters, so every letter must be its own token
    for a tiny model to learn them; a ``tokenizers`` BPE with no merges is exactly that, and it is what the engine
    loads from ``tokenizer.json``. ``Fuse`` makes decoding concatenate (no spaces between tokens).
    """
    from tokenizers import Tokenizer, decoders, models, processors

    vocab = {token: i for i, token in enumerate([*CHAR_SPECIALS, *CHAR_ALPHABET])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(list(CHAR_SPECIALS))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok


def save_char_tokenizer(tok: Any, out_dir: Path) -> None:
    """``tokenizer.json`` for the engine plus the Hugging Face wrapper files, so transformers can load it too."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))


def char_model_config() -> Any:
    """A tiny Llama config over the character vocabulary (vocab rounded up to 64 rows)."""
    from transformers import LlamaConfig

    return LlamaConfig(**CHAR_DIMS, vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)
