"""Trains the demo's base model and LoRA adapters on CPU, on character tasks whose answers can be checked.

Why these tasks: the prompt ``"<word>="`` is the same for every adapter, so only the adapter decides what comes
back (the base model copies, ``reverse`` reverses, ``upper`` uppercases, ``sort`` sorts, ``shift`` moves each
letter one step on), and every answer is right or wrong, so accuracy on held-out words shows the engine applies
the right adapter to the right row. Why cached by a fingerprint: building takes about a minute, a re-run must
take seconds, and a changed recipe must never reuse weights trained by another one.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import string
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# Bump when the training code changes what a recipe produces (the fingerprint covers the recipe's fields only).
RECIPE_VERSION = 1
MANIFEST = "manifest.json"
BUILD_DIR = re.compile(r"[0-9a-f]{12}")
PAD_ID, EOS_ID = 2, 1
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def answer(task: str, word: str) -> str:
    """The one right answer of ``task`` for ``word`` (lowercase letters)."""
    if task == "copy":
        return word
    if task == "reverse":
        return word[::-1]
    if task == "upper":
        return word.upper()
    if task == "sort":
        return "".join(sorted(word))
    if task == "shift":
        return "".join(chr((ord(c) - ord("a") + 1) % 26 + ord("a")) for c in word)
    raise ValueError(f"unknown demo task {task!r}")


@dataclass(frozen=True)
class Task:
    """One thing to learn: ``copy`` is the base model's, the others are one LoRA adapter each."""

    name: str
    description: str
    steps: int
    lr: float = 3e-3
    rank: int = 16  # LoRA rank (alpha = 2 x rank); unused for the base model


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights; its fingerprint names the cache folder."""

    base: Task = Task("copy", "copies the word", 300)
    adapters: tuple[Task, ...] = (
        Task("reverse", "reverses the word", 400),
        Task("upper", "uppercases it", 200, rank=8),
        Task("sort", "sorts its letters", 700, lr=4e-3, rank=32),
        Task("shift", "shifts each letter by one", 200, rank=8),
    )
    batch_size: int = 64
    min_len: int = 3
    max_len: int = 7
    held_out: int = 40
    repeat_share: float = 0.3
    seed: int = 0
    # Not in the fingerprint: threads change speed, not what is learned. One thread, because at these sizes two
    # threads were measured 1.5x faster on an idle 2-core box but 5-8x slower on a busy one (spin-waiting).
    threads: int = field(default=1, compare=False)

    def fingerprint(self) -> str:
        fields = asdict(self)
        fields.pop("threads")
        from loraplex.services.demo_assets import CHAR_ALPHABET, CHAR_DIMS

        model = {"dims": CHAR_DIMS, "alphabet": CHAR_ALPHABET}
        blob = json.dumps({"version": RECIPE_VERSION, "model": model, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class DemoAssets:
    """A finished build: the base model folder and one PEFT folder per adapter task."""

    folder: Path
    model_dir: Path
    adapters: dict[str, Path]  # task name -> PEFT adapter folder
    held_out: tuple[str, ...]
    recipe: Recipe
    trained: bool  # False when the cache was used
    seconds: float


def random_word(rng: random.Random, recipe: Recipe, letters: str = string.ascii_lowercase) -> str:
    length = rng.randint(recipe.min_len, recipe.max_len)
    return "".join(rng.choice(letters) for _ in range(length))


def held_out_words(recipe: Recipe) -> tuple[str, ...]:
    """Evaluation words: fixed by the seed, distinct, and never sampled for training."""
    rng = random.Random(f"held-out-{recipe.seed}")
    words: list[str] = []
    while len(words) < recipe.held_out:
        word = random_word(rng, recipe)
        if word not in words:
            words.append(word)
    return tuple(words)


def training_words(rng: random.Random, recipe: Recipe, count: int, held_out: frozenset[str]) -> list[str]:
    """Random words, a share of them from only a few letters.

    Why: with mostly distinct letters a model can reverse or sort by finding letters by *content*, which fails on
    repeats ("fvxv"); words full of repeats make position-based solutions the only ones that fit.
    """
    words: list[str] = []
    while len(words) < count:
        letters = string.ascii_lowercase
        if rng.random() < recipe.repeat_share:
            letters = "".join(rng.sample(string.ascii_lowercase, rng.randint(2, 4)))
        word = random_word(rng, recipe, letters)
        if word not in held_out:
            words.append(word)
    return words


def make_batch(tok: Any, prompts: Sequence[str], answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``labels`` (-100 on prompt and padding: only the answer + EOS is learned).

    The prompt goes through the same tokenizer call the engine makes for a text request (BOS prepended).
    """
    rows: list[list[int]] = []
    labels: list[list[int]] = []
    for prompt, target in zip(prompts, answers, strict=True):
        p = tok.encode(prompt, add_special_tokens=True).ids
        a = [*tok.encode(target, add_special_tokens=False).ids, EOS_ID]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return ids, lab


def train(
    model: torch.nn.Module,
    task: Task,
    recipe: Recipe,
    tok: Any,
    held_out: frozenset[str],
    progress: Progress,
) -> float:
    """AdamW with a one-cycle schedule on fresh random words every step; returns the last loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=task.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=task.lr, total_steps=task.steps, pct_start=0.1)
    rng = random.Random(f"{task.name}-{recipe.seed}")
    bar = progress.add_task(f"{task.name:<8} {task.description}", total=task.steps, loss=float("nan"))
    model.train()
    loss_value = float("nan")
    for _ in range(task.steps):
        words = training_words(rng, recipe, recipe.batch_size, held_out)
        if task.name == "copy":  # uppercase words too, so the base model's head has learned every letter
            words = [w.upper() if rng.random() < 0.5 else w for w in words]
        ids, labels = make_batch(tok, [f"{w}=" for w in words], [answer(task.name, w) for w in words])
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
        progress.update(bar, advance=1, loss=loss_value)
    model.eval()
    return loss_value


def train_base(recipe: Recipe, tok: Any, model_dir: Path, held_out: frozenset[str], progress: Progress) -> None:
    from transformers import LlamaForCausalLM

    from loraplex.services.demo_assets import char_model_config, save_char_tokenizer

    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(char_model_config())
    train(model, recipe.base, recipe, tok, held_out, progress)
    model.save_pretrained(str(model_dir), safe_serialization=True)
    save_char_tokenizer(tok, model_dir)


def train_adapter(
    recipe: Recipe, task: Task, index: int, tok: Any, model_dir: Path, out_dir: Path, held_out: frozenset[str],
    progress: Progress,
) -> None:  # fmt: skip
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    torch.manual_seed(recipe.seed + 1 + index)
    config = LoraConfig(
        r=task.rank, lora_alpha=2 * task.rank, target_modules=list(ALL_LINEAR), lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    train(model, task, recipe, tok, held_out, progress)
    model.save_pretrained(str(out_dir))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Train with ``count`` threads and give the caller (e.g. the engine started next) its setting back."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _assets(folder: Path, recipe: Recipe, trained: bool, seconds: float) -> DemoAssets:
    manifest = json.loads((folder / MANIFEST).read_text())
    return DemoAssets(
        folder=folder,
        model_dir=folder / "model",
        adapters={t.name: folder / "adapters" / t.name for t in recipe.adapters},
        held_out=tuple(manifest["held_out"]),
        recipe=recipe,
        trained=trained,
        seconds=seconds,
    )


def build_demo(
    root: Path, recipe: Recipe | None = None, console: Console | None = None, rebuild: bool = False
) -> DemoAssets:
    """Train (or reuse) the base model and adapters under ``root/<fingerprint[:12]>``.

    A build is complete when its manifest exists (written last); an incomplete folder from a killed run is
    trained again. Other complete builds in ``root`` are removed once the new one is done.
    """
    recipe = recipe or Recipe()
    console = console or Console()
    folder = root / recipe.fingerprint()[:12]
    start = time.perf_counter()
    if (folder / MANIFEST).is_file() and not rebuild:
        return _assets(folder, recipe, trained=False, seconds=time.perf_counter() - start)
    from loraplex.services.demo_assets import char_tokenizer

    shutil.rmtree(folder, ignore_errors=True)
    held_out = held_out_words(recipe)
    excluded = frozenset(held_out)
    tok = char_tokenizer()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
    )
    with torch_threads(recipe.threads), Progress(*columns, console=console) as progress:
        train_base(recipe, tok, folder / "model", excluded, progress)
        for i, task in enumerate(recipe.adapters):
            train_adapter(recipe, task, i, tok, folder / "model", folder / "adapters" / task.name, excluded, progress)
    manifest = {
        "recipe": recipe.fingerprint(),
        "held_out": list(held_out),
        "adapters": [t.name for t in recipe.adapters],
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for other in root.iterdir():
        if other != folder and other.is_dir() and BUILD_DIR.fullmatch(other.name) and (other / MANIFEST).is_file():
            shutil.rmtree(other)
    return _assets(folder, recipe, trained=True, seconds=time.perf_counter() - start)
