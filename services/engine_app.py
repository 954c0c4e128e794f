"""Builds and runs the engine from ``EngineSettings``: server up (NOT_SERVING) → load → warm up → SERVING.

Shutdown (SIGTERM) drains: health NOT_SERVING at once, new requests refused with UNAVAILABLE ``SHUTTING_DOWN``,
requests in flight (gRPC and HTTP alike) get ``--drain-seconds`` to finish, the rest end with that typed error,
then the servers stop and the step thread ends.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from loraplex.engine.adapters.disk_cache import DiskTier
from loraplex.engine.config import EngineConfig
from loraplex.engine.engine import LLMEngine
from loraplex.engine.request import GenerationRequest
from loraplex.engine.sampling import SamplingParams
from loraplex.engine.stats import EngineStats
from loraplex.engine.v1 import engine_service_pb2 as pb
from loraplex.engine.v1 import engine_service_pb2_grpc as pb_grpc
from loraplex.registry.client import RegistryClient
from loraplex.registry.errors import InvalidArgument
from loraplex.services.auth import TokenAuthority
from loraplex.services.base_model import determine_base_model
from loraplex.services.engine_metrics import EngineMetrics
from loraplex.services.engine_servicer import SERVICE_NAME, EngineRuntime, EngineServicer, merge_reference
from loraplex.services.fetcher import AdapterFetcher
from loraplex.services.generation import GenerationFrontend
from loraplex.services.mixes import MixBuilder
from loraplex.services.openai_api import build_app
from loraplex.services.openai_http import HttpServer
from loraplex.services.server import ServerHandle, ServiceBinding, run_until_signal, start_server
from loraplex.services.settings import EngineSettings

log = logging.getLogger("loraplex.engine")


def parse_tenant_weights(text: str) -> tuple[tuple[str, float], ...]:
    """``acme=2,beta=0.5`` → (("acme", 2.0), ("beta", 0.5)); a typed error names the bad entry."""
    weights: list[tuple[str, float]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        tenant, sep, raw = item.partition("=")
        try:
            weight = float(raw)
        except ValueError:
            weight = float("nan")
        if not sep or not tenant.strip() or not weight > 0 or weight == float("inf"):
            raise InvalidArgument(f"--tenant-weights entry {item!r} must be TENANT=POSITIVE_NUMBER")
        weights.append((tenant.strip(), weight))
    return tuple(weights)


def engine_config(settings: EngineSettings) -> EngineConfig:
    if not settings.model:
        raise InvalidArgument("--model is required: a Hugging Face model folder")
    return EngineConfig(
        model_dir=Path(settings.model),
        device=settings.device,
        dtype=settings.dtype,
        block_size=settings.block_size,
        kv_cache_bytes=settings.kv_cache_bytes,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_adapters_per_step=settings.max_adapters_per_batch,
        max_lora_rank=settings.max_lora_rank,
        gpu_adapter_bytes=settings.gpu_adapter_bytes,
        max_queue=settings.max_queue,
        max_model_len=settings.max_model_len,
        host_adapter_bytes=settings.host_adapter_bytes,
        quantization=settings.quantization,
        lora_backend=settings.lora_backend,
        enforce_eager=settings.enforce_eager,
        tenant_weights=parse_tenant_weights(settings.tenant_weights),
        max_wait_s=settings.max_wait_seconds,
        max_dora_adapters=settings.max_dora_adapters,
    )


async def warm_up(engine: LLMEngine) -> None:
    """One tiny generation so the first user request does not pay for lazy initialisation."""
    request = GenerationRequest("warmup", [0, 1, 2], SamplingParams(max_new_tokens=2, ignore_eos=True))
    async for _ in engine.generate(request):
        pass


def model_info(
    settings: EngineSettings, engine: LLMEngine, config: EngineConfig, base_model: str
) -> pb.GetModelInfoResponse:
    stats = engine.stats()
    spec = engine.model_spec
    return pb.GetModelInfoResponse(
        base_model=base_model,
        architecture=spec.architecture,
        max_context_length=engine.max_model_len,
        max_lora_rank=config.max_lora_rank,
        vocab_size=spec.vocab_size,
        device=settings.device,
        dtype=str(engine.core.loaded.dtype).removeprefix("torch."),
        device_adapter_capacity_bytes=sum(w.a_rows.nbytes + w.b_rows.nbytes for w in engine.core.pool.weights.values()),
        host_adapter_capacity_bytes=settings.host_adapter_bytes,
        max_adapters_per_batch=config.max_adapters_per_step,
        kv_cache_blocks=stats.kv_blocks_total,
        kv_block_size=config.block_size,
        quantization=engine.core.loaded.quantization,
    )


class EngineApp:
    """The running pieces, so tests and the CLI can start, inspect and stop one engine the same way."""

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.servicer = EngineServicer()
        self.metrics = EngineMetrics()
        self.handle: ServerHandle | None = None
        self.engine: LLMEngine | None = None
        self.fetcher: AdapterFetcher | None = None
        self.client: RegistryClient | None = None
        self.metrics_port: int | None = None
        self.base_model = settings.base_model or Path(settings.model).name
        self.http: HttpServer | None = None  # the OpenAI-compatible HTTP API (issue 10)

    @property
    def serving(self) -> bool:
        """Loaded, warmed up and not draining (what HTTP /health reports)."""
        return self.servicer.runtime is not None and self.engine is not None and not self.engine.draining

    # ---- OpenAI-compatible HTTP API (issue 10) -----------------------------------------------------------
    @property
    def http_port(self) -> int | None:
        """The OpenAI-compatible HTTP API's bound port; None when --http-listen is empty."""
        return self.http.port if self.http is not None else None

    # ---- end OpenAI-compatible HTTP API ------------------------------------------------------------------

    async def start(self) -> ServerHandle:
        """Start everything; on any failure, what was started is stopped again before the error propagates."""
        s = self.settings
        authority = TokenAuthority.from_file(s.tokens_file)
        binding = ServiceBinding(SERVICE_NAME, self.servicer, pb_grpc.add_EngineServiceServicer_to_server)
        self.handle = await start_server(
            [binding], s.listen, authority, insecure=s.insecure, serving=False, drain_seconds=s.drain_seconds
        )
        try:
            # ---- OpenAI-compatible HTTP API (issue 10): up now, 503 ENGINE_LOADING until the runtime is set ----
            if s.http_listen:
                app = build_app(lambda: self.servicer.runtime, lambda: self.serving, authority, Path(s.model))
                self.http = await HttpServer.start(app, s.http_listen, authority, insecure=s.insecure)
            # ---- end OpenAI-compatible HTTP API ----------------------------------------------------------
            return await self._start_engine(self.handle)
        except BaseException:
            await self.handle.stop(grace=0)
            if self.http is not None:  # OpenAI-compatible HTTP API (issue 10)
                await self.http.stop(grace=0)
            if self.engine is not None:
                await self.engine.shutdown()
            if self.client is not None:
                await self.client.close()
            raise

    async def _start_engine(self, handle: ServerHandle) -> ServerHandle:
        s = self.settings
        config = engine_config(s)
        config.validate()
        if s.registry:
            self.client = RegistryClient(s.registry, s.registry_token)
            self.base_model = await determine_base_model(self.client, Path(s.model), s.base_model)
        engine = await asyncio.to_thread(LLMEngine.load, config)
        await engine.start()
        await warm_up(engine)
        self.engine = engine
        if self.client is not None:
            self.fetcher = AdapterFetcher(
                engine,
                self.client,
                base_model=self.base_model,
                max_rank=config.max_lora_rank,
                alias_ttl_s=s.alias_ttl_seconds,
                observer=self.metrics,
                disk=DiskTier(Path(s.disk_cache_dir), s.disk_cache_bytes) if s.disk_cache_dir else None,
                pin_memory=config.device == "cuda",
            )
        self.metrics.bind_snapshot(self._snapshot)
        if s.metrics_port is not None:
            self.metrics_port = self.metrics.serve(s.metrics_port, s.metrics_host)
        mixes = MixBuilder(engine, self.fetcher, config.max_lora_rank) if self.fetcher is not None else None
        frontend = GenerationFrontend(engine, self.fetcher, self.metrics, mixes)
        info = model_info(s, engine, config, self.base_model)
        runtime = EngineRuntime(engine, self.fetcher, info, self.metrics, frontend)
        if s.merge_adapter:
            merged = await merge_reference(runtime, s.merge_adapter, s.registry_token or "")
            log.info("merged adapter into the base weights", extra={"adapter": merged.ref, "digest": merged.digest})
        self.servicer.runtime = runtime
        await handle.set_serving(True)
        log.info("engine serving", extra={"port": handle.port, "model": s.model, "base_model": self.base_model})
        return handle

    def _snapshot(self) -> tuple[EngineStats, int] | None:
        if self.engine is None:
            return None
        return self.engine.stats(), self.fetcher.disk_bytes() if self.fetcher is not None else 0

    async def stop(self) -> None:
        """Drain (see the module docstring), then release everything; safe to call more than once."""
        if self.handle is not None:
            await self.handle.set_serving(False)
        if self.engine is not None:
            ended = await self.engine.drain(self.settings.drain_seconds)
            if ended:
                log.info("drain deadline reached; ended requests still in flight", extra={"count": ended})
        if self.handle is not None:
            await self.handle.drain(seconds=min(2.0, self.settings.drain_seconds))
        # ---- OpenAI-compatible HTTP API (issue 10): the drain above ended its requests too; stop the server ----
        if self.http is not None:
            await self.http.stop(grace=min(2.0, self.settings.drain_seconds))
        # ---- end OpenAI-compatible HTTP API --------------------------------------------------------------
        if self.engine is not None:
            await self.engine.shutdown()
        if self.client is not None:
            await self.client.close()


async def serve_engine(settings: EngineSettings) -> None:
    app = EngineApp(settings)
    handle = await app.start()
    if app.metrics_port is not None:
        print(f"loraplex engine metrics on port {app.metrics_port}", flush=True)
    if app.http_port is not None:  # OpenAI-compatible HTTP API (issue 10)
        print(f"loraplex engine http on port {app.http_port}", flush=True)
    print(f"loraplex engine listening on port {handle.port}", flush=True)
    await run_until_signal(handle, on_stop=app.stop)
