"""``loraplex demo``: trained adapters that visibly work, served from one base model in one mixed batch.

What it does: train (once, cached in ``./.loraplex/demo``) a tiny character-level Llama that copies a word and
four LoRA adapters that reverse / uppercase / sort / shift it; push them to the registry on embedded defaults
(SQLite + local folder); start the engine pulling adapters from that registry; then send every held-out word to
the base model and every adapter at once — one concurrent batch over gRPC — and stream the answers with
per-adapter accuracy. Why: a newcomer sees the whole path (registry validation, on-demand fetch, multi-LoRA
batching) give different, checkable answers to the same prompt. The same functions are the engine's semantic
end-to-end test (tests/e2e/test_demo.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from loraplex.engine.v1 import engine_service_pb2 as epb
from loraplex.engine.v1 import engine_service_pb2_grpc as epb_grpc
from loraplex.registry.client import RegistryClient
from loraplex.registry.errors import NotFound
from loraplex.services.demo_train import DemoAssets, answer, build_demo
from loraplex.services.engine_app import EngineApp
from loraplex.services.registry_app import start_registry
from loraplex.services.settings import EngineSettings, MiB, RegistrySettings

DEMO_DIR = Path(".loraplex/demo")
NAMESPACE = "demo"
PASS_ACCURACY = 0.95
SAMPLE_ROWS = 8  # words shown live; accuracy always counts every held-out word
MAX_NEW_TOKENS = 12  # longest answer (7 letters) + EOS, with room to see a model that does not stop


@dataclass(frozen=True)
class Column:
    """One model of the mixed batch: the base model (``ref`` empty) or an adapter, and the task it should do."""

    ref: str
    task: str
    description: str = ""

    @property
    def label(self) -> str:
        return self.ref or "base model"


@dataclass
class Answer:
    """One streamed request; mutated only by the coroutine that owns it, read by the live view."""

    column: Column
    word: str
    text: str = ""
    digest: str = ""  # the adapter version the engine resolved and applied ("" for the base model)
    tokens: int = 0  # completion tokens, as the engine counts them (EOS included)
    done: bool = False

    @property
    def expected(self) -> str:
        return answer(self.column.task, self.word)

    @property
    def ok(self) -> bool:
        return self.done and self.text == self.expected


def columns(assets: DemoAssets) -> list[Column]:
    base = assets.recipe.base
    adapters = [Column(f"{NAMESPACE}/{t.name}", t.name, t.description) for t in assets.recipe.adapters]
    return [Column("", base.name, base.description), *adapters]


def base_model_name(model_dir: Path) -> str:
    """Named after its config, so a rebuilt model with other shapes never collides with an older registration."""
    return "demo-chars-" + hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()[:8]


async def publish(client: RegistryClient, assets: DemoAssets, console: Console) -> str:
    """Register the base model and push every adapter; idempotent (request ids derive from the content)."""
    base = base_model_name(assets.model_dir)
    await client.register_base_model(base, (assets.model_dir / "config.json").read_text())
    for task, folder in assets.adapters.items():
        name = f"{NAMESPACE}/{task}"
        try:
            existing = await client.get_adapter(name)
            if existing.base_model != base:  # left by a demo build with another base model: the namespace is ours
                await client.delete_adapter(name, force=True)
                raise NotFound(f"{name} was for {existing.base_model}")
        except NotFound:
            await client.create_adapter(name, base, description=f"loraplex demo: {task}")
        config = (folder / "adapter_config.json").read_text()
        weights = (folder / "adapter_model.safetensors").read_bytes()
        request_id = "demo-" + hashlib.sha256(config.encode() + weights).hexdigest()[:32]
        version = await client.upload(name, config, weights, request_id=request_id)
        await client.set_alias(name, "prod", version.version)
        console.print(f"  pushed [cyan]{name}@{version.version}[/] rank {version.rank}  {version.digest[:19]}…")
    return base


def engine_settings(model_dir: Path, base_model: str, registry: str) -> EngineSettings:
    """Room for the whole mixed batch in one step: 5 models x 40 words, ~20 tokens each."""
    return EngineSettings(
        model=str(model_dir),
        base_model=base_model,
        registry=registry,
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        max_num_seqs=256,
        max_num_batched_tokens=4096,
        kv_cache_bytes=32 * MiB,
        max_adapters_per_batch=8,
        max_lora_rank=64,
    )


@dataclass(frozen=True)
class Addresses:
    registry: str
    engine: str


@asynccontextmanager
async def demo_stack(assets: DemoAssets, settings: RegistrySettings, console: Console) -> AsyncIterator[Addresses]:
    """Registry + engine in this process, adapters pushed; yields both addresses and stops both on exit."""
    registry = await start_registry(settings)
    engine: EngineApp | None = None
    try:
        address = f"127.0.0.1:{registry.port}"
        console.print(f"[bold]registry[/] on {address}")
        console.print(f"  db {settings.db}  blobs {settings.blobs}")
        async with RegistryClient(address) as client:
            base = await publish(client, assets, console)
        engine = EngineApp(engine_settings(assets.model_dir, base, address))
        handle = await engine.start()
        console.print(f"[bold]engine[/] on 127.0.0.1:{handle.port}  base model [cyan]{base}[/]")
        yield Addresses(registry=address, engine=f"127.0.0.1:{handle.port}")
    finally:
        if engine is not None:
            await engine.stop()
        await registry.stop(grace=1.0)


async def stream_one(stub: epb_grpc.EngineServiceStub, item: Answer) -> None:
    request = epb.GenerateStreamRequest(
        adapter=item.column.ref,
        text=f"{item.word}=",
        sampling=epb.SamplingParams(temperature=0.0),
        stopping=epb.StoppingCriteria(max_new_tokens=MAX_NEW_TOKENS),
    )
    async for message in stub.GenerateStream(request):
        if message.HasField("adapter"):
            item.digest = message.adapter.digest
        if message.HasField("usage"):
            item.tokens = message.usage.completion_tokens
        item.text += message.text
    item.done = True


async def mixed_batch(
    address: str, cols: Sequence[Column], words: Sequence[str], on_start: Callable[[list[Answer]], None] | None = None
) -> list[Answer]:
    """Every word to every column, all requests in flight at once on one channel; answers in (word, column) order."""
    items = [Answer(col, word) for word in words for col in cols]
    if on_start is not None:
        on_start(items)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = epb_grpc.EngineServiceStub(channel)
        await asyncio.gather(*(stream_one(stub, item) for item in items))
    return items


def accuracy(items: Sequence[Answer]) -> dict[Column, float]:
    totals: dict[Column, list[int]] = {}
    for item in items:
        counts = totals.setdefault(item.column, [0, 0])
        counts[0] += item.ok
        counts[1] += 1
    return {col: ok / n for col, (ok, n) in totals.items()}


class LiveView:
    """The first words' answers as they stream (rich re-renders this on every refresh)."""

    def __init__(self, cols: Sequence[Column], rows: int):
        self.cols = list(cols)
        self.rows = rows
        self.items: list[Answer] = []

    def bind(self, items: list[Answer]) -> None:
        self.items = items

    def __rich__(self) -> Table:
        table = Table("prompt", *(f"{c.label}\n[dim]{c.task}[/]" for c in self.cols), title="one mixed batch")
        for r in range(self.rows):
            row = self.items[r * len(self.cols) : (r + 1) * len(self.cols)]
            if row:
                table.add_row(f"{row[0].word}=", *(_cell(item) for item in row))
        return table


def _cell(item: Answer) -> Text:
    if not item.done:
        return Text(item.text + "…", style="dim")
    if item.ok:
        return Text(f"{item.text} ✓", style="green")
    return Text(f"{item.text} ✗ (want {item.expected})", style="red")


def summary(items: Sequence[Answer], seconds: float) -> Group:
    words = len({item.word for item in items})
    table = Table("model", "what it should do", "correct", "accuracy", title=f"held-out accuracy ({words} words)")
    for col, acc in accuracy(items).items():
        ok = sum(item.ok for item in items if item.column == col)
        style = "green" if acc >= PASS_ACCURACY else "red"
        table.add_row(col.label, col.description or col.task, f"{ok}/{words}", Text(f"{acc:.1%}", style=style))
    tokens = sum(item.tokens for item in items)
    line = Text(f"{len(items)} concurrent requests, {tokens} tokens generated in {seconds:.2f} s")
    return Group(table, line)


def passed(items: Sequence[Answer]) -> bool:
    """Every adapter at or above the bar (the base model's copy accuracy is shown, not gated)."""
    return all(acc >= PASS_ACCURACY for col, acc in accuracy(items).items() if col.ref)


async def run_demo(settings: RegistrySettings, root: Path = DEMO_DIR, rebuild: bool = False) -> int:
    console = Console()
    # Synchronous on purpose: nothing else runs yet, and torch's thread setting is per calling thread.
    assets = build_demo(root, console=console, rebuild=rebuild)
    how = "trained" if assets.trained else "cached"
    checks = "  ".join(f"{task} {score:.0%}" for task, score in assets.validation.items())
    console.print(f"[bold]assets[/] {how} in {assets.seconds:.1f} s: {assets.folder}")
    console.print(f"  validation: {checks}")
    async with demo_stack(assets, settings, console) as addresses:
        cols = columns(assets)
        view = LiveView(cols, SAMPLE_ROWS)
        start = time.perf_counter()
        with Live(view, console=console, refresh_per_second=12):
            items = await mixed_batch(addresses.engine, cols, assets.held_out, on_start=view.bind)
        console.print()
        console.print(summary(items, time.perf_counter() - start))
    ok = passed(items)
    console.print("[green]every adapter ≥ 95%[/]" if ok else "[red]an adapter is below 95%[/]")
    return 0 if ok else 1


def demo_settings() -> RegistrySettings:
    """Embedded defaults, on a free loopback port."""
    return RegistrySettings(listen="127.0.0.1:0", spool_dir=str(Path(tempfile.gettempdir()) / "loraplex-spool"))
