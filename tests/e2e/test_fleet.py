"""A fleet on loopback: 2 registry processes on one PostgreSQL + an S3 endpoint, 3 engines, and a real HAProxy
running deploy/haproxy/haproxy.cfg, as compose's ``fleet`` profile does.

What it proves: requests through the proxy give the PEFT oracle's tokens; routing by adapter keeps each adapter
on one engine (6 adapters → 6 registry downloads over the fleet, not 18), for gRPC (x-loraplex-adapter header)
and OpenAI HTTP (the body's "model") alike; when an engine is SIGKILLed, requests keep succeeding on the others
(a client retries once on UNAVAILABLE / 503); uploads through either registry replica get distinct consecutive
versions. Bounded in time: tiny models, 8 new tokens per request.

The HTTP half needs the engine's HTTP door (``--http-listen``, GET /health). Engines without it answer no health
check on their HTTP port, so the gRPC half then runs the same config with the gRPC backend's health check moved
to a TCP check of the gRPC port (the only change), and the HTTP test is skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch

from loraplex.engine.v1 import engine_service_pb2 as epb
from loraplex.engine.v1 import engine_service_pb2_grpc as epb_grpc
from loraplex.registry.client import RegistryClient
from tests.e2e.stack import Stack, Streamed, collect, engine_args, push, register, stream_request
from tests.engine.helpers import peft_model, prompts, until_eos
from tests.fixtures.backends import PostgresServer, _create_database, free_port, make_bucket
from tests.fixtures.hf import read_adapter
from tests.fixtures.procs import ServerProcess, registry_args, run_cli, start_server

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
ROUTING_HEADER = "x-loraplex-adapter"
ADAPTERS = ["qv-r4", "all-r8", "attn-r16-rs", "mlp-r32", "o-down-r12", "pattern-r8"]
DOWNLOADS = {"tier": "registry", "event": "download"}
EOS = 1
NEW_TOKENS = 8
PROMPTS = prompts(60, 6, seed=11)


def _haproxy() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if found is None:
        pytest.skip("haproxy not installed (tools/setup.sh --test installs it)")
    return found


@dataclass
class Fleet:
    model_dir: Path
    registries: list[ServerProcess]
    engines: list[ServerProcess]
    engine_http_ports: list[int]
    proxy: subprocess.Popen[bytes]
    proxy_log: Path
    grpc_port: int
    http_port: int
    stats_port: int
    http_door: bool
    digests: dict[str, str] = field(default_factory=dict)  # adapter ref -> digest

    def alive(self) -> list[int]:
        return [i for i, e in enumerate(self.engines) if e.proc.poll() is None]

    def downloads(self) -> float:
        """Registry cold loads summed over the live engines (their Prometheus counters)."""
        return sum(
            Stack(self.registries[0], self.engines[i], self.model_dir).metric(
                "loraplex_adapter_cache_events_total", **DOWNLOADS
            )
            for i in self.alive()
        )

    def holders(self) -> dict[str, list[int]]:
        """adapter digest -> the live engines whose caches hold it."""

        async def resident(address: str) -> set[str]:
            async with grpc.aio.insecure_channel(address) as channel:
                reply = await epb_grpc.EngineServiceStub(channel).ListResidentAdapters(
                    epb.ListResidentAdaptersRequest(), timeout=30
                )
            return {a.digest for a in reply.adapters}

        held = {i: asyncio.run(resident(self.engines[i].address)) for i in self.alive()}
        return {digest: [i for i in held if digest in held[i]] for digest in self.digests.values()}

    def server_states(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> HAProxy's status (UP, DOWN, …), from its stats page."""
        url = f"http://127.0.0.1:{self.stats_port}/stats;csv"
        rows = urllib.request.urlopen(url, timeout=5).read().decode().splitlines()
        header = rows[0].lstrip("# ").split(",")
        status = header.index("status")
        return {
            (cells[0], cells[1]): cells[status]
            for cells in (row.split(",") for row in rows[1:] if row)
            if cells[1].startswith("engine")
        }

    def wait_for_servers(self, backends: list[str], want: set[int], timeout: float = 60.0) -> None:
        """Until exactly the engines ``want`` (0-based) are UP in every backend named."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proxy.poll() is None, f"HAProxy exited:\n{self.proxy_log.read_text()}"
            try:
                states = self.server_states()
            except OSError:  # HAProxy still starting
                states = {}
            up = {(b, s) for (b, s), st in states.items() if st == "UP" and b in backends}
            if up == {(b, f"engine{i + 1}") for b in backends for i in want}:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"HAProxy servers: {states}\n{self.proxy_log.read_text()}")
            time.sleep(0.5)


def _http_door_answers(port: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return True
        except urllib.error.HTTPError:
            pass  # 503 while loading: wait
        except OSError:
            pass  # nothing listening (yet)
        time.sleep(0.5)
    return False


def _proxy_config(tmp: Path, http_door: bool) -> Path:
    if http_door:
        return HAPROXY_CFG
    text = HAPROXY_CFG.read_text()
    text = text.replace("\nbackend engines_grpc\n", "\nbackend engines_grpc\n    option tcp-check\n", 1)
    for i in (1, 2, 3):
        text = text.replace(f' check port "${{LORAPLEX_ENGINE_{i}_HTTP_PORT}}" check-proto h1', " check")
    path = tmp / "haproxy-grpc-only.cfg"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def fleet(
    tiny_models: dict[str, Path],
    tiny_adapters: dict[str, dict[str, Path]],
    postgres_server: PostgresServer,
    s3_endpoint: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fleet]:
    haproxy = _haproxy()
    tmp = tmp_path_factory.mktemp("fleet")
    model_dir = tiny_models["llama"]
    db_url = _create_database(postgres_server, f"fleet_{uuid.uuid4().hex[:12]}")
    bucket = f"fleet-{uuid.uuid4().hex[:12]}"
    make_bucket(s3_endpoint, bucket)
    started: list[ServerProcess] = []
    proxy: subprocess.Popen[bytes] | None = None
    try:
        # One after the other: the first applies the migrations, the second finds them done.
        for _ in range(2):
            started.append(start_server(registry_args(db_url, f"s3://{bucket}/adapters", s3_endpoint)))
        registries = list(started)
        asyncio.run(register(registries[0].address, model_dir))
        http_ports = [free_port() for _ in range(3)]
        with ThreadPoolExecutor(3) as pool:
            engines = list(
                pool.map(
                    lambda i: start_server(
                        engine_args(
                            model_dir, registries[i % 2].address, "--http-listen", f"127.0.0.1:{http_ports[i]}"
                        ),
                        timeout=300,
                    ),
                    range(3),
                )
            )
        started += engines
        http_door = all(_http_door_answers(port) for port in http_ports)
        grpc_port, http_port, stats_port = free_port(), free_port(), free_port()
        env = {
            "PATH": os.environ.get("PATH", ""),
            "LORAPLEX_PROXY_GRPC_BIND": f"127.0.0.1:{grpc_port}",
            "LORAPLEX_PROXY_HTTP_BIND": f"127.0.0.1:{http_port}",
            "LORAPLEX_PROXY_STATS_BIND": f"127.0.0.1:{stats_port}",
        }
        for i, (engine, port) in enumerate(zip(engines, http_ports, strict=True), start=1):
            env[f"LORAPLEX_ENGINE_{i}_GRPC"] = engine.address
            env[f"LORAPLEX_ENGINE_{i}_HTTP"] = f"127.0.0.1:{port}"
            env[f"LORAPLEX_ENGINE_{i}_HTTP_PORT"] = str(port)
        log = tmp / "haproxy.log"
        with log.open("wb") as sink:
            proxy = subprocess.Popen(
                [haproxy, "-db", "-f", str(_proxy_config(tmp, http_door))], env=env, stdout=sink, stderr=sink
            )
        running = Fleet(
            model_dir, registries, engines, http_ports, proxy, log, grpc_port, http_port, stats_port, http_door
        )
        # Push the adapters through both replicas (they share PostgreSQL and S3).
        for i, name in enumerate(ADAPTERS):
            ref = f"fleet/{name}"
            running.digests[ref] = asyncio.run(push(registries[i % 2].address, ref, tiny_adapters["llama"][name]))
        backends = ["engines_grpc", "engines_http"] if http_door else ["engines_grpc"]
        running.wait_for_servers(backends, {0, 1, 2})
        yield running
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(timeout=30)
        with ThreadPoolExecutor(len(started) or 1) as pool:
            list(pool.map(lambda server: server.stop(), started))


@pytest.fixture(scope="module")
def oracle(fleet: Fleet, tiny_adapters: dict[str, dict[str, Path]]) -> dict[tuple[str, int], list[int]]:
    """PEFT generate for every (adapter ref, prompt index) the tests send."""
    zoo = {name: tiny_adapters["llama"][name] for name in ADAPTERS}
    model = peft_model(fleet.model_dir, zoo)
    rows = [(ADAPTERS[i % len(ADAPTERS)], i) for i in range(len(PROMPTS))]
    input_ids = torch.tensor([PROMPTS[i] for _, i in rows])
    with torch.no_grad():
        out = model.generate(
            input_ids, adapter_names=[name for name, _ in rows], do_sample=False, max_new_tokens=NEW_TOKENS
        )
    return {
        (f"fleet/{name}", i): until_eos(row[input_ids.shape[1] :].tolist(), EOS)
        for (name, i), row in zip(rows, out, strict=True)
    }


def ref_of(i: int) -> str:
    return f"fleet/{ADAPTERS[i % len(ADAPTERS)]}"


async def generate(stub: epb_grpc.EngineServiceStub, ref: str, i: int, header: bool = True) -> Streamed:
    """One request through the proxy, retried once on UNAVAILABLE (what a client of a fleet does)."""
    metadata = ((ROUTING_HEADER, ref),) if header else ()
    for attempt in range(2):
        try:
            return await collect(stub, stream_request(ref, PROMPTS[i], NEW_TOKENS), metadata=metadata, timeout=120)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt:
                raise
            await asyncio.sleep(0.2)  # a client's backoff
    raise AssertionError("unreachable")


async def through_proxy(fleet: Fleet, indices: list[int], concurrency: int) -> dict[int, Streamed]:
    limit = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fleet.grpc_port}") as channel:
        stub = epb_grpc.EngineServiceStub(channel)

        async def one(i: int) -> tuple[int, Streamed]:
            async with limit:
                return i, await generate(stub, ref_of(i), i)

        return dict(await asyncio.gather(*(one(i) for i in indices)))


def fresh_adapter(fleet: Fleet, folder: Path, name: str) -> str:
    """Push an adapter no other test uses (its digest is in no engine's cache yet) and return its ref."""
    ref = f"fleet/{name}-{uuid.uuid4().hex[:6]}"
    fleet.digests[ref] = asyncio.run(push(fleet.registries[0].address, ref, folder))
    return ref


def assert_oracle(fleet: Fleet, oracle: dict[tuple[str, int], list[int]], results: dict[int, Streamed]) -> None:
    for i, got in results.items():
        ref = ref_of(i)
        assert got.token_ids == oracle[(ref, i)], (ref, i)
        assert got.adapter is not None and got.adapter.digest == fleet.digests[ref]


# ------------------------------------------------------------------------------------------------ gRPC
def test_grpc_through_haproxy_matches_peft_and_keeps_each_adapter_on_one_engine(
    fleet: Fleet, oracle: dict[tuple[str, int], list[int]]
) -> None:
    # 30 requests one at a time: the proxy's choice is the hash ring alone (no load to bound).
    sequential = asyncio.run(through_proxy(fleet, list(range(30)), concurrency=1))
    assert_oracle(fleet, oracle, sequential)
    assert fleet.downloads() == len(ADAPTERS), "each adapter must be fetched by exactly one engine"
    holders = {ref: fleet.holders()[fleet.digests[ref]] for ref in map(ref_of, range(len(ADAPTERS)))}
    assert all(len(engines) == 1 for engines in holders.values()), holders
    assert len({e for engines in holders.values() for e in engines}) >= 2, f"one engine got everything: {holders}"
    # 30 more, 6 at a time: bounded load may spill a busy adapter to a second engine; outputs stay exact.
    concurrent = asyncio.run(through_proxy(fleet, list(range(30, 60)), concurrency=6))
    assert_oracle(fleet, oracle, concurrent)
    assert fleet.downloads() <= 2 * len(ADAPTERS)


def test_requests_without_the_routing_header_go_round_robin(fleet: Fleet) -> None:
    """The header is what keeps affinity: the same adapter without it lands on every engine in turn."""

    async def three() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{fleet.grpc_port}") as channel:
            stub = epb_grpc.EngineServiceStub(channel)
            for i in (0, 6, 12):
                await generate(stub, ref_of(0), i, header=False)

    asyncio.run(three())
    assert fleet.holders()[fleet.digests[ref_of(0)]] == [0, 1, 2]


def test_node_example_sends_the_routing_header(fleet: Fleet, tiny_adapters: dict[str, dict[str, Path]]) -> None:
    node = shutil.which("node")
    client = ROOT / "examples" / "node" / "generate.js"
    if node is None or not (client.parent / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip("node or the example's npm packages are missing (tools/setup.sh --test installs them)")
    ref = fresh_adapter(fleet, tiny_adapters["llama"]["all-r64"], "node-probe")
    before = fleet.downloads()
    for _ in range(3):  # round-robin would visit every engine
        command = [node, str(client), "--engine", f"127.0.0.1:{fleet.grpc_port}", "--adapter", ref]
        result = subprocess.run([*command, "--max-new-tokens", "4", "Hi"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert f"adapter {ref}@1 {fleet.digests[ref]}" in result.stdout
    assert fleet.downloads() == before + 1 and len(fleet.holders()[fleet.digests[ref]]) == 1


def test_cli_generate_sends_the_routing_header(fleet: Fleet, tiny_adapters: dict[str, dict[str, Path]]) -> None:
    ref = fresh_adapter(fleet, tiny_adapters["llama"]["embed-head-r8"], "cli-probe")
    before = fleet.downloads()
    for _ in range(3):  # round-robin would visit every engine
        command = ["generate", "--engine", f"127.0.0.1:{fleet.grpc_port}", "--adapter", ref, "--max-new-tokens", "4"]
        result = run_cli([*command, "Hi"])
        assert result.returncode == 0, result.stderr
        assert f"[{ref}@1 {fleet.digests[ref][:19]}" in result.stderr
    assert fleet.downloads() == before + 1 and len(fleet.holders()[fleet.digests[ref]]) == 1


# ------------------------------------------------------------------------------------------------ HTTP
def test_openai_http_through_haproxy_routes_by_model(fleet: Fleet) -> None:
    if not fleet.http_door:
        pytest.skip("the engines serve no HTTP door (--http-listen, GET /health) in this build")
    grpc_texts = asyncio.run(through_proxy(fleet, list(range(12)), concurrency=3))
    before = fleet.downloads()
    for i in range(12):
        body = {"model": ref_of(i), "prompt": PROMPTS[i], "max_tokens": NEW_TOKENS, "temperature": 0}
        reply = _post_retrying_once(f"http://127.0.0.1:{fleet.http_port}/v1/completions", body)
        assert reply["model"] == ref_of(i) and reply["choices"][0]["text"] == grpc_texts[i].text, (i, reply)
    # The body's "model" hashes to the same engine as the gRPC header: no engine fetched anything new.
    assert fleet.downloads() == before


def _post_retrying_once(url: str, body: dict[str, object]) -> dict[str, object]:
    data = json.dumps(body).encode()
    for attempt in range(2):
        request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                result: dict[str, object] = json.loads(reply.read())
                return result
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt:
                raise AssertionError(f"{exc.code}: {exc.read().decode()}") from exc
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------ registry
def test_uploads_through_either_replica_get_distinct_consecutive_versions(
    fleet: Fleet, tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    name = f"fleet/versions-{uuid.uuid4().hex[:8]}"
    payloads = [read_adapter(tiny_adapters["llama"][adapter]) for adapter in ADAPTERS]

    async def upload_all() -> list[tuple[int, str]]:
        clients = [RegistryClient(r.address) for r in fleet.registries]
        try:
            await clients[0].create_adapter(name, "tiny-llama")
            versions = await asyncio.gather(
                *(clients[i % 2].upload(name, config, weights) for i, (config, weights) in enumerate(payloads))
            )
            # Each replica resolves every version the other one wrote.
            for version in versions:
                for client in clients:
                    assert (await client.resolve(f"{name}@{version.version}")).digest == version.digest
            return [(v.version, v.digest) for v in versions]
        finally:
            for client in clients:
                await client.close()

    versions = asyncio.run(upload_all())
    assert sorted(v for v, _ in versions) == list(range(1, len(payloads) + 1))
    assert len({d for _, d in versions}) == len(payloads)


# ------------------------------------------------------------------------------------------------ failure
def test_a_stopping_engine_is_taken_out_and_requests_keep_succeeding(
    fleet: Fleet, oracle: dict[tuple[str, int], list[int]]
) -> None:
    """SIGTERM: the engine drains (GET /health 503, then gone); HAProxy's health checks take it out of both
    backends within a few check intervals, and the others serve its adapters."""
    victim = fleet.alive()[-1]
    fleet.engines[victim].stop()
    backends = ["engines_grpc", "engines_http"] if fleet.http_door else ["engines_grpc"]
    fleet.wait_for_servers(backends, set(fleet.alive()), timeout=20)
    assert_oracle(fleet, oracle, asyncio.run(through_proxy(fleet, list(range(24, 36)), concurrency=3)))


def test_sigkill_one_engine_and_requests_keep_succeeding(
    fleet: Fleet, oracle: dict[tuple[str, int], list[int]]
) -> None:
    """Last in this module: it leaves the fleet with one engine (after the drained one)."""
    holders = fleet.holders()
    counts = {i: sum(i in engines for engines in holders.values()) for i in fleet.alive()}
    victim = max(counts, key=lambda i: counts[i])  # the engine holding the most adapters
    fleet.engines[victim].proc.kill()
    fleet.engines[victim].proc.wait(timeout=30)
    # At once (before any health check noticed), then after HAProxy took it out: every request succeeds.
    try:
        assert_oracle(fleet, oracle, asyncio.run(through_proxy(fleet, list(range(12)), concurrency=3)))
    except grpc.aio.AioRpcError as exc:
        log = fleet.proxy_log.read_text()[-12000:]
        raise AssertionError(f"{exc.code()} {exc.details()}\nHAProxy log:\n{log}") from exc
    fleet.wait_for_servers(["engines_grpc"], set(fleet.alive()))
    assert_oracle(fleet, oracle, asyncio.run(through_proxy(fleet, list(range(12, 24)), concurrency=3)))
    holders = fleet.holders()
    assert all(holders[fleet.digests[ref_of(i)]] for i in range(len(ADAPTERS))), holders
