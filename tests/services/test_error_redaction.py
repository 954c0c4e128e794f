"""Infrastructure failures reach clients as a generic message with the request id; hosts, DSNs, URLs stay in the log.

Real outages on loopback: the registry's PostgreSQL goes away (its connections run through a TCP relay the test
closes), its S3 endpoint does not answer, and a client's registry address is dead. The client-visible status text
must name none of the addresses; the server log must keep the driver's detail for the operator.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from loraplex.registry.client import RegistryClient
from loraplex.registry.errors import Unavailable
from loraplex.registry.v1 import registry_service_pb2 as pb
from tests.fixtures.backends import PostgresServer, free_port
from tests.fixtures.hf import read_adapter
from tests.services.conftest import close_registry, open_registry
from tests.services.rpc_helpers import expect_failure
from tests.services.test_registry_rpc import chunk, header, upload_stream


class TcpRelay:
    """127.0.0.1:<port> → 127.0.0.1:<target>; ``close`` drops every connection and stops listening."""

    def __init__(self, target: int) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._target))
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(): close alone would not
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def server_log() -> Iterator[Captured]:
    handler = Captured()
    logger = logging.getLogger("loraplex")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _assert_redacted(message: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in message, f"{secret!r} leaked to the client: {message}"


async def test_postgres_down_is_generic_for_clients_and_detailed_in_the_log(
    postgres_server: PostgresServer, fresh_postgres_url: str, tmp_path: Path, server_log: Captured
) -> None:
    from loraplex.services.settings import RegistrySettings

    relay = TcpRelay(postgres_server.port)
    db_url = fresh_postgres_url.replace(f":{postgres_server.port}/", f":{relay.port}/")
    settings = RegistrySettings(
        listen="127.0.0.1:0", db=db_url, blobs=f"file://{tmp_path / 'blobs'}", spool_dir=str(tmp_path / "spool")
    )
    reg = await open_registry(settings)
    try:
        request = pb.GetBaseModelRequest(name="tiny-llama")
        await expect_failure(reg.stub.GetBaseModel(request), grpc.StatusCode.NOT_FOUND)  # the database answers
        relay.close()
        for attempt in range(2):  # the pooled connection dies, then new connections are refused
            failure = await expect_failure(
                reg.stub.GetBaseModel(request, metadata=(("x-request-id", f"pg-down-{attempt}"),)),
                grpc.StatusCode.UNAVAILABLE,
            )
            assert "metadata database" in failure.message and f"pg-down-{attempt}" in failure.message
            _assert_redacted(failure.message, "127.0.0.1", str(relay.port), "postgres", "psycopg", "port")
        assert any(str(relay.port) in line or "server closed" in line for line in server_log.lines), server_log.lines
    finally:
        await close_registry(reg)


async def test_s3_down_is_generic_for_clients_and_detailed_in_the_log(
    tmp_path: Path,
    tiny_models: dict[str, Path],
    tiny_adapters: dict[str, dict[str, Path]],
    server_log: Captured,
    aws_test_env: None,
) -> None:
    from loraplex.services.settings import RegistrySettings

    port = free_port()  # nothing listens here: the S3 endpoint is down
    settings = RegistrySettings(
        listen="127.0.0.1:0",
        db=f"sqlite:///{tmp_path / 'r.db'}",
        blobs="s3://secret-bucket/adapters",
        s3_endpoint=f"http://127.0.0.1:{port}",
        spool_dir=str(tmp_path / "spool"),
    )
    reg = await open_registry(settings)
    try:
        await reg.client.register_base_model("tiny-llama", (tiny_models["llama"] / "config.json").read_text())
        await reg.client.create_adapter("acme/s3down", "tiny-llama")
        config, weights = read_adapter(tiny_adapters["llama"]["qv-r4"])
        failure = await expect_failure(
            reg.stub.UploadAdapterVersion(
                upload_stream(header("acme/s3down", config, len(weights)), chunk(weights)),
                metadata=(("x-request-id", "s3-down"),),
            ),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert "blob store" in failure.message and "s3-down" in failure.message
        _assert_redacted(failure.message, "http", "127.0.0.1", str(port), "secret-bucket", "adapters/")
        assert any(f"127.0.0.1:{port}" in line for line in server_log.lines), server_log.lines
    finally:
        await close_registry(reg)


async def test_a_dead_registry_address_is_not_relayed_by_the_client_error() -> None:
    """The engine relays registry failures to its own callers: the error it gets must not name the registry."""
    port = free_port()
    async with RegistryClient(f"127.0.0.1:{port}", timeout=3) as client:
        with pytest.raises(Unavailable) as info:
            await client.resolve("acme/x")
    assert info.value.reason == "REGISTRY_UNAVAILABLE"
    _assert_redacted(info.value.message, "127.0.0.1", str(port), "ipv4")
    assert str(port) in info.value.detail  # kept for the log of whoever relays it
