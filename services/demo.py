"""``loraplex demo``: the registry on embedded defaults, with a scripted push → list → resolve → pull.

Why in-process: a newcomer sees the whole write and read path (validation, content addressing, aliases) in a
few seconds with nothing to start by hand. Assets are built once with transformers + PEFT on CPU and cached in
``./.loraplex/demo``; re-runs reuse them, and pushes carry a request id derived from the content, so running the
demo twice does not pile up versions.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loraplex.registry.client import RegistryClient
from loraplex.registry.errors import NotFound
from loraplex.services.registry_app import start_registry
from loraplex.services.settings import RegistrySettings

DEMO_DIR = Path(".loraplex/demo")
BASE_MODEL = "demo-llama"
ADAPTERS = {
    # name -> (rank, alpha, targets)
    "demo/qv-small": (4, 8.0, ("q_proj", "v_proj")),
    "demo/all-linear": (16, 32.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
}


def build_assets(root: Path, console: Console) -> tuple[Path, dict[str, Path]]:
    from loraplex.services.demo_assets import AdapterSpec, build_adapter, build_model

    model_dir = root / "model"
    if not (model_dir / "config.json").exists():
        with console.status("building a tiny Llama (random weights) …"):
            build_model(model_dir, arch="llama", seed=0)
    adapters = {}
    for i, (name, (rank, alpha, targets)) in enumerate(ADAPTERS.items()):
        folder = root / "adapters" / name.replace("/", "__")
        if not (folder / "adapter_model.safetensors").exists():
            with console.status(f"training-free PEFT adapter {name} (rank {rank}) …"):
                build_adapter(model_dir, folder, AdapterSpec(r=rank, lora_alpha=alpha, target_modules=targets, seed=i))
        adapters[name] = folder
    return model_dir, adapters


async def run_demo(settings: RegistrySettings, root: Path = DEMO_DIR) -> int:
    console = Console()
    model_dir, adapters = build_assets(root, console)
    handle = await start_registry(settings)
    address = f"127.0.0.1:{handle.port}"
    console.print(f"[bold]registry[/] on {address}  db={settings.db}  blobs={settings.blobs}")
    try:
        async with RegistryClient(address) as client:
            model = await client.register_base_model(BASE_MODEL, (model_dir / "config.json").read_text())
            console.print(
                f"registered base model [cyan]{model.name}[/] ({model.architecture}, hidden {model.hidden_size})"
            )
            for name, folder in adapters.items():
                try:
                    await client.get_adapter(name)
                except NotFound:
                    await client.create_adapter(name, BASE_MODEL, description="loraplex demo adapter")
                config = (folder / "adapter_config.json").read_text()
                weights = (folder / "adapter_model.safetensors").read_bytes()
                request_id = "demo-" + hashlib.sha256(config.encode() + weights).hexdigest()[:32]
                version = await client.upload(name, config, weights, request_id=request_id)
                await client.set_alias(name, "prod", version.version)
                console.print(f"pushed [cyan]{name}@{version.version}[/] {version.digest[:19]}… alias prod")
            table = Table("adapter", "base model", "latest", "aliases")
            for a in await client.list_adapters(namespace="demo"):
                table.add_row(
                    a.name, a.base_model, str(a.latest_version), ", ".join(f"{k}→{v}" for k, v in a.aliases.items())
                )
            console.print(table)
            for name in adapters:
                for ref in (name, f"{name}@prod"):
                    v = await client.resolve(ref)
                    console.print(f"resolve {ref:<28} → version {v.version}  rank {v.rank}  {v.digest[:23]}…")
            first = next(iter(adapters))
            pulled = await client.download(f"{first}@prod")
            original = (adapters[first] / "adapter_model.safetensors").read_bytes()
            same = hashlib.sha256(pulled.weights).digest() == hashlib.sha256(original).digest()
            console.print(f"pulled {first}@prod: {len(pulled.weights)} bytes, byte-for-byte equal: {same}")
            return 0 if same else 1
    finally:
        await handle.stop(grace=1.0)


def demo_settings() -> RegistrySettings:
    """Embedded defaults, on a free loopback port."""
    return RegistrySettings(listen="127.0.0.1:0", spool_dir=str(Path(tempfile.gettempdir()) / "loraplex-spool"))
