"""The gRPC server bootstrap both services share: aio server, health, reflection, interceptors, shutdown.

Why one bootstrap: both services must behave the same way operationally — health NOT_SERVING until ready and
again during shutdown, reflection listing every service (so grpcurl works), SIGTERM draining in-flight RPCs,
errors mapped by one interceptor — and a copy per service would drift.

Draining (SIGTERM): health turns NOT_SERVING at once so balancers stop sending; RPCs in flight get up to
``drain_seconds`` to finish; whatever is still running then ends with UNAVAILABLE + ErrorInfo ``SHUTTING_DOWN``
(never gRPC's bare "Cancelling all calls"), and only then does the server stop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraplex.registry.errors import FailedPrecondition
from loraplex.services.auth import AuthInterceptor, TokenAuthority
from loraplex.services.errors import ErrorInterceptor, InFlight

log = logging.getLogger("loraplex.server")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


@dataclass(frozen=True)
class ServiceBinding:
    """One servicer and how to attach it: ``add(servicer, server)`` is the generated ``add_*_to_server``."""

    full_name: str
    servicer: Any
    add: Callable[[Any, grpc.aio.Server], None]


@dataclass
class ServerHandle:
    server: grpc.aio.Server
    port: int
    health: Any  # grpc_health.v1.health.aio.HealthServicer (absent from the type stubs)
    service_names: Sequence[str]
    in_flight: InFlight = field(default_factory=InFlight)
    drain_seconds: float = 5.0
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float = 5.0) -> None:
        """Flip health to NOT_SERVING first so balancers drain, then let in-flight RPCs finish within ``grace``."""
        if self.stopped.is_set():
            return
        await self.set_serving(False)
        await self.server.stop(grace)
        self.stopped.set()

    async def drain(self, seconds: float | None = None) -> None:
        """NOT_SERVING now; RPCs in flight get ``seconds`` to finish; the rest end with ``SHUTTING_DOWN``; stop."""
        if self.stopped.is_set():
            return
        await self.set_serving(False)
        await self.in_flight.wait_idle(self.drain_seconds if seconds is None else seconds)
        ended = self.in_flight.end_all()
        if ended:
            log.info("ended RPCs still running at the end of the drain", extra={"count": ended})
            await self.in_flight.wait_idle(2.0)
        await self.stop(grace=1.0)


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(listen: str, authority: TokenAuthority, insecure: bool) -> None:
    """Refuse to listen beyond loopback with auth off, unless the operator said ``--insecure``."""
    if not authority.enabled and not is_loopback(listen) and not insecure:
        raise FailedPrecondition(
            f"refusing to listen on {listen} without tokens: configure --tokens-file, bind 127.0.0.1, "
            "or pass --insecure",
            reason="INSECURE_LISTEN",
        )


def probe_bind(listen: str) -> None:
    """Refuse an address that cannot be bound, with the OS's reason, before gRPC tries (and logs) it.

    Why a probe: gRPC reports a failed bind only as "Failed to bind" after writing its own log line to stderr; the
    operator should get one line that says why (``BIND_FAILED``: address already in use). The probe binds like
    gRPC does (``SO_REUSEADDR``, no ``SO_REUSEPORT``) and closes at once; anything it cannot judge (a hostname that
    does not resolve, port 0, a unix socket) is left to gRPC, whose failure maps to the same reason.
    """
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) == 0 or host.startswith("unix"):
        return
    try:
        infos = socket.getaddrinfo(
            host.strip("[]") or None, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, UnicodeError):
        return
    failures: list[OSError] = []
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                failures.append(exc)
    if infos and len(failures) == len(infos):  # gRPC too fails only when no resolved address binds
        reason = failures[0].strerror or str(failures[0])
        raise FailedPrecondition(f"cannot listen on {listen}: {reason}", reason="BIND_FAILED")


async def start_server(
    bindings: Sequence[ServiceBinding],
    listen: str,
    authority: TokenAuthority,
    *,
    insecure: bool = False,
    serving: bool = True,
    drain_seconds: float = 5.0,
) -> ServerHandle:
    """Build, bind and start the server; health is SERVING only when ``serving`` (else call ``set_serving``)."""
    check_exposure(listen, authority, insecure)
    in_flight = InFlight()
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(in_flight), AuthInterceptor(authority)], options=SERVER_OPTIONS
    )
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for binding in bindings:
        binding.add(binding.servicer, server)
    names = [b.full_name for b in bindings]
    reflection.enable_server_reflection(
        (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    probe_bind(listen)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError:  # an address in use or malformed: grpcio raises (older releases returned 0)
        port = 0
    if port == 0:
        raise FailedPrecondition(
            f"cannot listen on {listen}: the address is in use or cannot be bound", reason="BIND_FAILED"
        )
    await server.start()
    handle = ServerHandle(
        server=server,
        port=port,
        health=health_servicer,
        service_names=names,
        in_flight=in_flight,
        drain_seconds=drain_seconds,
    )
    await handle.set_serving(serving)
    return handle


async def run_until_signal(handle: ServerHandle, on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then shut down: ``on_stop`` (the service's own drain and cleanup, which may
    drain the server itself) and then ``handle.drain()`` (a no-op once the server stopped)."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    waiter = asyncio.create_task(handle.server.wait_for_termination())
    signalled = asyncio.create_task(stop_requested.wait())
    await asyncio.wait({waiter, signalled}, return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down", extra={"port": handle.port})
    if on_stop is not None:
        await on_stop()
    await handle.drain()
    for task in (waiter, signalled):
        task.cancel()
