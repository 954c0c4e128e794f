"""``loraplex demo`` as the engine's semantic end-to-end test: trained adapters must do their task through gRPC.

The demo's own build (same recipe, same code path) trains a copy-task base model and four LoRA adapters on CPU
(~1.5 min), then a real registry and engine serve them and one mixed batch of held-out words is checked word by
word. Then the CLI runs twice in that folder on the cached build: it must pass, reuse the cache and not pile up
versions.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from loraplex.registry.client import RegistryClient
from loraplex.services.demo import PASS_ACCURACY, Answer, Column, accuracy, columns, demo_stack, mixed_batch
from loraplex.services.demo_assets import char_tokenizer
from loraplex.services.demo_train import DemoAssets, Recipe, Task, answer, build_demo, evaluation_words, training_words
from loraplex.services.settings import RegistrySettings


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like a user's cwd after ``loraplex demo``: the build lives in ``.loraplex/demo``."""
    return tmp_path_factory.mktemp("demo-cwd")


@pytest.fixture(scope="module")
def assets(workdir: Path) -> DemoAssets:
    built = build_demo(workdir / ".loraplex" / "demo", console=Console(file=io.StringIO()))
    assert built.trained
    print(f"demo build: {built.seconds:.1f} s")
    return built


def test_tasks_have_one_checkable_answer() -> None:
    assert [answer(t, "hello") for t in ("copy", "reverse", "upper", "sort", "shift")] == [
        "hello",
        "olleh",
        "HELLO",
        "ehllo",
        "ifmmp",
    ]
    assert answer("shift", "xyz") == "yza"
    with pytest.raises(ValueError):
        answer("rot13", "abc")


def test_evaluation_words_are_never_trained_on() -> None:
    recipe = Recipe()
    words = evaluation_words(recipe)
    assert len(words) == len(set(words)) == recipe.held_out + recipe.validation_words
    assert words == evaluation_words(recipe)  # fixed by the seed
    trained = training_words(random.Random(3), recipe, 50_000, frozenset(words))
    assert not set(trained) & set(words)
    assert all(recipe.min_len <= len(w) <= recipe.max_len and w.islower() and len(set(w)) == len(w) for w in trained)
    assert {len(w) for w in trained} == set(range(recipe.min_len, recipe.max_len + 1))


def test_fingerprint_follows_the_recipe_not_the_thread_count() -> None:
    assert Recipe().fingerprint() == Recipe(threads=2).fingerprint()
    assert Recipe().fingerprint() != Recipe(seed=1).fingerprint()
    with pytest.raises(ValueError):
        Recipe(min_len=5, max_len=4)
    with pytest.raises(ValueError):
        Recipe(adapters=(Task("rot13", "rotates", 10),))


def test_char_tokenizer_encodes_what_the_engine_sends() -> None:
    tok = char_tokenizer()
    encoded = tok.encode("abz=", add_special_tokens=True)
    assert encoded.tokens == ["<s>", "a", "b", "z", "="]
    assert tok.decode([*tok.encode("ZYX", add_special_tokens=False).ids, 1], skip_special_tokens=True) == "ZYX"
    assert tok.encode("a b", add_special_tokens=False).tokens == ["a", "<unk>", "b"]


async def test_every_adapter_does_its_task_in_one_mixed_batch(assets: DemoAssets, tmp_path: Path) -> None:
    settings = RegistrySettings(
        listen="127.0.0.1:0", db=f"sqlite:///{tmp_path}/registry.db", blobs=f"file://{tmp_path}/b"
    )
    cols = columns(assets)
    assert [c.task for c in cols] == ["copy", "reverse", "upper", "sort", "shift"]
    async with demo_stack(assets, settings, Console(file=io.StringIO())) as addresses:
        items = await mixed_batch(addresses.engine, cols, assets.held_out)
        async with RegistryClient(addresses.registry) as client:
            pushed = {c: (await client.resolve(c.ref)).digest for c in cols[1:]}
    assert len(items) == len(cols) * len(assets.held_out) and all(i.done for i in items)
    scores = accuracy(items)
    print({c.label: f"{a:.1%}" for c, a in scores.items()})
    for col, acc in scores.items():
        assert acc >= PASS_ACCURACY, (col, wrong(items, col))
    by_column = {c: [i for i in items if i.column == c] for c in cols}
    base = by_column[cols[0]]
    assert all(i.digest == "" for i in base)
    for col in cols[1:]:
        same = sum(a.text == b.text for a, b in zip(base, by_column[col], strict=True))
        assert same < len(base) // 4, f"{col.ref} answers like the base model on {same} words"
        assert {i.digest for i in by_column[col]} == {pushed[col]}


def wrong(items: list[Answer], col: Column) -> list[tuple[str, str, str]]:
    return [(i.word, i.text, i.expected) for i in items if i.column == col and not i.ok]


def test_cli_on_the_cached_build_passes_fast_and_pushes_once(assets: DemoAssets, workdir: Path) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    outputs = []
    for _ in range(2):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "loraplex.services.cli", "demo"],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        print(f"cached `loraplex demo`: {time.perf_counter() - start:.1f} s")
        assert done.returncode == 0, done.stdout + done.stderr
        outputs.append(done.stdout)
    for out in outputs:
        assert "assets cached" in out and "every adapter ≥ 95%" in out
        for task in assets.adapters:
            assert f"pushed demo/{task}@1 " in out  # the second run's pushes are idempotent retries
    assert (workdir / ".loraplex" / "registry.db").is_file()
    assert [p.name for p in (workdir / ".loraplex" / "demo").iterdir()] == [assets.folder.name]
