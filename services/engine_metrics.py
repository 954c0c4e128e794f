"""Prometheus metrics of one engine process, in their own registry (no module-level global state).

Two kinds: counters and histograms the request path and the fetcher update as things happen, and gauges that a
collector reads at scrape time from the engine's published ``EngineStats`` snapshot (lock-free: a scrape never
waits for a forward pass). The router-protocol gauges keep the names and meanings LoRA-aware routers (the
Kubernetes inference gateway's endpoint picker / llm-d router) read from vLLM-style servers, under ``loraplex_``:

- ``loraplex_num_requests_waiting`` / ``loraplex_num_requests_running``: queue and batch size;
- ``loraplex_kv_cache_usage_perc``: used KV blocks / all blocks, 0..1;
- ``loraplex_cache_config_info{block_size,num_gpu_blocks}`` = 1;
- ``loraplex_lora_requests_info{running_lora_adapters,waiting_lora_adapters,max_lora}`` = the snapshot's time:
  comma-separated adapter names as clients sent them; an adapter with any running request is only in
  ``running``, one whose requests all wait only in ``waiting``; ``max_lora`` = distinct adapters per batch;
- ``loraplex_lora_adapter_loaded{adapter,tier,pinned,rank}`` = 1 per resident adapter (tier gpu = the device
  pool whatever the device, cpu = host memory only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraplex.engine.stats import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _SnapshotCollector(Collector):
    """Gauges computed at scrape time from the latest ``EngineStats`` (None before the engine loads)."""

    def __init__(self, read: Callable[[], tuple[EngineStats, int] | None]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        """Every family always (so ``# TYPE`` lines exist before the engine loads); samples once it has."""
        snapshot = self._read()
        st, disk_bytes = snapshot if snapshot is not None else (None, 0)
        waiting = GaugeMetricFamily("loraplex_num_requests_waiting", "Requests waiting to be scheduled")
        running = GaugeMetricFamily("loraplex_num_requests_running", "Requests in the running batch")
        usage = GaugeMetricFamily("loraplex_kv_cache_usage_perc", "Used KV-cache blocks over all blocks (0..1)")
        free = GaugeMetricFamily("loraplex_kv_blocks_free", "Free KV-cache blocks")
        config = GaugeMetricFamily(
            "loraplex_cache_config_info", "KV-cache layout (value 1)", labels=["block_size", "num_gpu_blocks"]
        )
        lora = GaugeMetricFamily(
            "loraplex_lora_requests_info",
            "Adapters with running and with only waiting requests (value: snapshot time, seconds)",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        loaded = GaugeMetricFamily(
            "loraplex_lora_adapter_loaded",
            "Resident adapters (value 1 each)",
            labels=["adapter", "tier", "pinned", "rank"],
        )
        cache = GaugeMetricFamily("loraplex_adapter_cache_bytes", "Bytes held per adapter tier", labels=["tier"])
        if st is not None:
            waiting.add_metric([], st.num_waiting)
            running.add_metric([], st.num_running)
            usage.add_metric([], st.kv_usage)
            free.add_metric([], st.kv_blocks_free)
            config.add_metric([str(st.block_size), str(st.kv_blocks_total)], 1.0)
            names = [",".join(st.running_adapter_names), ",".join(st.waiting_adapter_names)]
            lora.add_metric([*names, str(st.max_adapters_per_step)], st.created)
            for view in st.residents:
                name = f"{view.info.adapter}@{view.info.version}" if view.info.adapter else view.key
                tier = "gpu" if view.slot is not None else "cpu"
                loaded.add_metric([name, tier, str(view.pinned).lower(), str(view.info.rank)], 1.0)
            cache.add_metric(["device"], float(sum(r.nbytes for r in st.resident_adapters)))
            cache.add_metric(["host"], float(st.host_bytes))
            cache.add_metric(["disk"], float(disk_bytes))
        yield from (waiting, running, usage, free, config, lora, loaded, cache)


class EngineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loraplex_requests",
            "Generation requests by door (grpc, http) and final status code",
            ["door", "code"],
            registry=r,
        )
        self.tokens = Counter("loraplex_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("loraplex_ttft_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(
            "loraplex_inter_token_seconds", "Time between streamed tokens", buckets=LATENCY_BUCKETS, registry=r
        )
        self.adapter_load = Histogram(
            "loraplex_adapter_load_seconds",
            "Adapter load latency by tier",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_events = Counter(
            "loraplex_adapter_cache_events",
            "Adapter cache hits/misses/evictions by tier",
            ["tier", "event"],
            registry=r,
        )
        self._snapshot: Callable[[], tuple[EngineStats, int] | None] = lambda: None
        r.register(_SnapshotCollector(lambda: self._snapshot()))

    def count_request(self, door: str, code: str) -> None:
        """Every request ends here exactly once: OK, or the gRPC status code name it failed with."""
        self.requests.labels(door, code).inc()

    # FetchObserver: the adapter fetcher reports here.
    def on_event(self, tier: str, event: str) -> None:
        self.cache_events.labels(tier, event).inc()

    def on_load(self, tier: str, seconds: float) -> None:
        self.adapter_load.labels(tier).observe(seconds)

    def bind_snapshot(self, read: Callable[[], tuple[EngineStats, int] | None]) -> None:
        """Where scrape-time gauges come from: (the engine's latest stats, disk-tier bytes)."""
        self._snapshot = read

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(server.server_port)
