"""Bearer tokens, namespaces and scopes on a real registry server; refusal to listen openly without tokens."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from loraplex.registry.v1 import registry_service_pb2 as pb
from loraplex.services.auth import TokenAuthority
from loraplex.services.server import check_exposure, is_loopback
from tests.fixtures.hf import read_adapter
from tests.services.conftest import close_registry, open_registry, registry_settings
from tests.services.rpc_helpers import expect_failure

TOKENS = {
    "tokens": [
        {"name": "admin", "token": "admin-token", "namespaces": ["*"], "scopes": ["admin"]},
        {"name": "acme-writer", "token": "acme-write", "namespaces": ["acme"], "scopes": ["write"]},
        {"name": "acme-reader", "token": "acme-read", "namespaces": ["acme"], "scopes": ["read"]},
        {"name": "beta-writer", "token": "beta-write", "namespaces": ["beta"], "scopes": ["write"]},
    ]
}


def md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_tokens_bind_namespaces_and_scopes(
    registry_backend: object, tmp_path: Path, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps(TOKENS))
    reg = await open_registry(registry_settings(registry_backend, tmp_path, tokens_file=str(tokens_file)))
    stub = reg.stub
    try:
        config = (tiny_models["llama"] / "config.json").read_text()
        register = pb.RegisterBaseModelRequest(name="tiny-llama", config_json=config)
        await expect_failure(stub.RegisterBaseModel(register), grpc.StatusCode.UNAUTHENTICATED)
        await expect_failure(stub.RegisterBaseModel(register, metadata=md("wrong")), grpc.StatusCode.UNAUTHENTICATED)
        await expect_failure(
            stub.RegisterBaseModel(register, metadata=(("authorization", "Basic abc"),)),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        await expect_failure(
            stub.RegisterBaseModel(register, metadata=md("acme-write")), grpc.StatusCode.PERMISSION_DENIED
        )
        await stub.RegisterBaseModel(register, metadata=md("admin-token"))

        create = pb.CreateAdapterRequest(adapter=pb.Adapter(name="acme/bot", base_model="tiny-llama"))
        await expect_failure(stub.CreateAdapter(create, metadata=md("acme-read")), grpc.StatusCode.PERMISSION_DENIED)
        await expect_failure(stub.CreateAdapter(create, metadata=md("beta-write")), grpc.StatusCode.PERMISSION_DENIED)
        await stub.CreateAdapter(create, metadata=md("acme-write"))
        await stub.CreateAdapter(
            pb.CreateAdapterRequest(adapter=pb.Adapter(name="beta/bot", base_model="tiny-llama")),
            metadata=md("beta-write"),
        )

        cfg, weights = read_adapter(tiny_adapters["llama"]["qv-r4"])

        async def upload() -> None:
            yield pb.UploadAdapterVersionRequest(
                header=pb.UploadAdapterVersionRequest.Header(
                    adapter="acme/bot", adapter_config_json=cfg, size_bytes=len(weights)
                )
            )
            yield pb.UploadAdapterVersionRequest(chunk=weights)

        await expect_failure(
            stub.UploadAdapterVersion(upload(), metadata=md("acme-read")), grpc.StatusCode.PERMISSION_DENIED
        )
        await stub.UploadAdapterVersion(upload(), metadata=md("acme-write"))

        # Reads: own namespace yes, another namespace PERMISSION_DENIED; listings show only what one may read.
        resolve = pb.ResolveAdapterRequest(ref="acme/bot")
        assert (await stub.ResolveAdapter(resolve, metadata=md("acme-read"))).adapter_version.version == 1
        await expect_failure(stub.ResolveAdapter(resolve, metadata=md("beta-write")), grpc.StatusCode.PERMISSION_DENIED)
        download = stub.DownloadAdapterVersion(
            pb.DownloadAdapterVersionRequest(ref="acme/bot"), metadata=md("beta-write")
        )
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            async for _ in download:
                pass
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        listed = await stub.ListAdapters(pb.ListAdaptersRequest(), metadata=md("acme-read"))
        assert [a.name for a in listed.adapters] == ["acme/bot"]
        everything = await stub.ListAdapters(pb.ListAdaptersRequest(), metadata=md("admin-token"))
        assert [a.name for a in everything.adapters] == ["acme/bot", "beta/bot"]
        await expect_failure(
            stub.ListAdapters(pb.ListAdaptersRequest(namespace="beta"), metadata=md("acme-read")),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        # Health stays open without a token.
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(reg.channel)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await close_registry(reg)


def test_open_listen_without_tokens_is_refused_unless_insecure() -> None:
    off = TokenAuthority.disabled()
    assert is_loopback("127.0.0.1:1") and is_loopback("[::1]:1") and is_loopback("localhost:1")
    assert not is_loopback("0.0.0.0:1") and not is_loopback("[::]:1") and not is_loopback(":1")
    check_exposure("127.0.0.1:50052", off, insecure=False)
    from loraplex.registry.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition, match="--insecure"):
        check_exposure("0.0.0.0:50052", off, insecure=False)
    check_exposure("0.0.0.0:50052", off, insecure=True)
    on = TokenAuthority.from_document(TOKENS)
    check_exposure("0.0.0.0:50052", on, insecure=False)


def test_tokens_file_is_validated(tmp_path: Path) -> None:
    from loraplex.registry.errors import InvalidArgument

    for doc in (
        {},
        {"tokens": [{"token": "x", "namespaces": ["a"], "scopes": ["root"]}]},
        {"tokens": [{"namespaces": ["a"], "scopes": ["read"]}]},
    ):
        with pytest.raises(InvalidArgument):
            TokenAuthority.from_document(doc)


async def test_two_authorization_headers_are_ambiguous_credentials(
    registry_backend: object, tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """Two ``authorization`` entries used to mean "the last one wins": a proxy and the server could disagree on who
    the caller is. Now the call is UNAUTHENTICATED, with auth on and with auth off (the engine forwards tokens)."""
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps(TOKENS))
    request = pb.ListAdaptersRequest()
    both = (("authorization", "Bearer acme-read"), ("authorization", "Bearer admin-token"))
    same_twice = (("authorization", "Bearer admin-token"), ("authorization", "Bearer admin-token"))
    for tokens in (str(tokens_file), None):
        reg = await open_registry(registry_settings(registry_backend, tmp_path, tokens_file=tokens))
        try:
            for metadata in (both, same_twice):
                failure = await expect_failure(
                    reg.stub.ListAdapters(request, metadata=metadata),
                    grpc.StatusCode.UNAUTHENTICATED,
                    "AMBIGUOUS_CREDENTIALS",
                )
                assert "exactly one" in failure.message
            await reg.stub.ListAdapters(request, metadata=md("admin-token"))
        finally:
            await close_registry(reg)


def test_authenticate_headers_is_the_rule_for_http_too() -> None:
    """The HTTP door passes every ``Authorization`` header value: one is authenticated, two are refused."""
    from loraplex.registry.errors import Unauthenticated

    authority = TokenAuthority.from_document(TOKENS)
    assert authority.authenticate_headers(["Bearer acme-read"]).name == "acme-reader"
    for values in (["Bearer acme-read", "Bearer admin-token"], ["Bearer admin-token"] * 2):
        with pytest.raises(Unauthenticated) as info:
            authority.authenticate_headers(values)
        assert info.value.reason == "AMBIGUOUS_CREDENTIALS"
    with pytest.raises(Unauthenticated):
        authority.authenticate_headers([])
    with pytest.raises(Unauthenticated):
        TokenAuthority.disabled().authenticate_headers(["Bearer a", "Bearer b"])
