"""Prometheus metrics of one engine process, in their own registry (no module-level global state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EngineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loraplex_requests", "Generation requests by door (grpc, http) and final status code", ["door", "code"],
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
        self.cache_bytes = Gauge("loraplex_adapter_cache_bytes", "Bytes held per adapter tier", ["tier"], registry=r)
        self.queue_depth = Gauge("loraplex_queue_depth", "Requests waiting to be scheduled", registry=r)
        self.running = Gauge("loraplex_running_sequences", "Sequences in the running batch", registry=r)
        self.kv_free = Gauge("loraplex_kv_blocks_free", "Free KV-cache blocks", registry=r)

    def count_request(self, door: str, code: str) -> None:
        """Every request ends here exactly once: OK, or the gRPC status code name it failed with."""
        self.requests.labels(door, code).inc()

    # FetchObserver: the adapter fetcher reports here.
    def on_event(self, tier: str, event: str) -> None:
        self.cache_events.labels(tier, event).inc()

    def on_load(self, tier: str, seconds: float) -> None:
        self.adapter_load.labels(tier).observe(seconds)

    def bind_gauges(self, read: Callable[[], dict[str, float]]) -> None:
        """Gauges read live values at scrape time (queue, running, kv, tier bytes) from one snapshot function."""
        self.queue_depth.set_function(lambda: read()["waiting"])
        self.running.set_function(lambda: read()["running"])
        self.kv_free.set_function(lambda: read()["kv_free"])
        self.cache_bytes.labels("device").set_function(lambda: read()["device_bytes"])
        self.cache_bytes.labels("host").set_function(lambda: read()["host_bytes"])
        self.cache_bytes.labels("disk").set_function(lambda: read()["disk_bytes"])

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(server.server_port)
