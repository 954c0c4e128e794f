"""Every registry RPC through a real gRPC server, on SQLite + local folder and PostgreSQL + S3."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from loraplex.registry.blobs import open_blob_store
from loraplex.registry.v1 import registry_service_pb2 as pb
from tests.fixtures.hf import read_adapter
from tests.services.conftest import RunningRegistry
from tests.services.rpc_helpers import expect_failure

MODEL_NAMES = {"llama": "tiny-llama", "mistral": "tiny-mistral", "qwen2": "tiny-qwen2"}


async def register_models(reg: RunningRegistry, tiny_models: dict[str, Path]) -> None:
    for arch, folder in tiny_models.items():
        await reg.client.register_base_model(MODEL_NAMES[arch], (folder / "config.json").read_text())


def blob_keys(reg: RunningRegistry) -> set[str]:
    store = open_blob_store(reg.settings.blobs, reg.settings.s3_endpoint)
    return {info.key for info in store.list("")}


async def snapshot(reg: RunningRegistry, adapter: str) -> tuple[object, ...]:
    versions = await reg.stub.ListAdapterVersions(pb.ListAdapterVersionsRequest(adapter=adapter))
    got = await reg.stub.GetAdapter(pb.GetAdapterRequest(name=adapter))
    return (tuple(v.version for v in versions.adapter_versions), got.adapter.etag, frozenset(blob_keys(reg)))


async def upload_stream(*messages: pb.UploadAdapterVersionRequest) -> AsyncIterator[pb.UploadAdapterVersionRequest]:
    for m in messages:
        yield m


def header(adapter: str, config: str, size: int, **kw: object) -> pb.UploadAdapterVersionRequest:
    return pb.UploadAdapterVersionRequest(
        header=pb.UploadAdapterVersionRequest.Header(adapter=adapter, adapter_config_json=config, size_bytes=size, **kw)
    )


def chunk(data: bytes) -> pb.UploadAdapterVersionRequest:
    return pb.UploadAdapterVersionRequest(chunk=data)


# -- base models ---------------------------------------------------------------------------------------
async def test_base_models_register_get_list(registry: RunningRegistry, tiny_models: dict[str, Path]) -> None:
    await register_models(registry, tiny_models)
    got = await registry.client.get_base_model("tiny-qwen2")
    assert (got.model_type, got.hidden_size, got.num_key_value_heads, got.vocab_size) == ("qwen2", 64, 2, 320)
    assert got.architecture == "Qwen2ForCausalLM"
    names = [m.name for m in await registry.client.list_base_models()]
    assert names == sorted(MODEL_NAMES.values())
    # Idempotent for the same config; a different config under the same name is refused.
    config = (tiny_models["llama"] / "config.json").read_text()
    again = await registry.client.register_base_model("tiny-llama", config)
    assert again.create_time == (await registry.client.get_base_model("tiny-llama")).create_time
    other = json.loads(config) | {"hidden_size": 128}
    await expect_failure(
        registry.stub.RegisterBaseModel(pb.RegisterBaseModelRequest(name="tiny-llama", config_json=json.dumps(other))),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    await expect_failure(
        registry.stub.GetBaseModel(pb.GetBaseModelRequest(name="nope")),
        grpc.StatusCode.NOT_FOUND,
        "BASE_MODEL_NOT_FOUND",
    )
    bad = json.loads(config) | {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    await expect_failure(
        registry.stub.RegisterBaseModel(pb.RegisterBaseModelRequest(name="gpt", config_json=json.dumps(bad))),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await expect_failure(
        registry.stub.RegisterBaseModel(pb.RegisterBaseModelRequest(name="Bad/Name", config_json=config)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert len(await registry.client.list_base_models()) == 3


# -- adapters ------------------------------------------------------------------------------------------
async def test_adapter_crud_pagination_and_etags(registry: RunningRegistry, tiny_models: dict[str, Path]) -> None:
    await register_models(registry, tiny_models)
    for i in range(25):
        ns = "acme" if i % 2 == 0 else "beta"
        base = "tiny-llama" if i < 20 else "tiny-qwen2"
        await registry.client.create_adapter(
            f"{ns}/bot-{i:02d}", base, labels={"tier": "gold" if i % 5 == 0 else "std"}
        )
    await expect_failure(
        registry.stub.CreateAdapter(
            pb.CreateAdapterRequest(adapter=pb.Adapter(name="acme/bot-00", base_model="tiny-llama"))
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    await expect_failure(
        registry.stub.CreateAdapter(pb.CreateAdapterRequest(adapter=pb.Adapter(name="acme/x", base_model="missing"))),
        grpc.StatusCode.NOT_FOUND,
        "BASE_MODEL_NOT_FOUND",
    )
    for bad_name in ("../etc", "acme/../x", "Acme/x", "acme", "acme/x/y", "a" * 64 + "/x", "acme/x y"):
        await expect_failure(
            registry.stub.CreateAdapter(
                pb.CreateAdapterRequest(adapter=pb.Adapter(name=bad_name, base_model="tiny-llama"))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )

    seen: list[str] = []
    request = pb.ListAdaptersRequest(page_size=10)
    pages = 0
    while True:
        response = await registry.stub.ListAdapters(request)
        seen += [a.name for a in response.adapters]
        pages += 1
        if not response.next_page_token:
            break
        request.page_token = response.next_page_token
    assert pages == 3 and len(seen) == 25 and seen == sorted(seen)
    assert len(await registry.client.list_adapters(base_model="tiny-qwen2")) == 5
    assert {a.name for a in await registry.client.list_adapters(labels={"tier": "gold"})} == {
        f"{'acme' if i % 2 == 0 else 'beta'}/bot-{i:02d}" for i in range(0, 25, 5)
    }
    assert all(a.name.startswith("beta/") for a in await registry.client.list_adapters(namespace="beta"))
    await expect_failure(
        registry.stub.ListAdapters(pb.ListAdaptersRequest(page_token="garbage")), grpc.StatusCode.INVALID_ARGUMENT
    )

    current = (await registry.stub.GetAdapter(pb.GetAdapterRequest(name="acme/bot-00"))).adapter
    mask = field_mask_pb2.FieldMask(paths=["description", "labels"])
    update = pb.Adapter(name="acme/bot-00", description="new", labels={"team": "x"}, etag=current.etag)
    updated = (await registry.stub.UpdateAdapter(pb.UpdateAdapterRequest(adapter=update, update_mask=mask))).adapter
    assert updated.description == "new" and dict(updated.labels) == {"team": "x"} and updated.etag != current.etag
    stale = pb.Adapter(name="acme/bot-00", description="lost update", etag=current.etag)
    await expect_failure(
        registry.stub.UpdateAdapter(
            pb.UpdateAdapterRequest(adapter=stale, update_mask=field_mask_pb2.FieldMask(paths=["description"]))
        ),
        grpc.StatusCode.ABORTED,
    )
    await expect_failure(
        registry.stub.UpdateAdapter(
            pb.UpdateAdapterRequest(adapter=update, update_mask=field_mask_pb2.FieldMask(paths=["base_model"]))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert (await registry.client.get_adapter("acme/bot-00")).description == "new"

    await registry.stub.DeleteAdapter(pb.DeleteAdapterRequest(name="acme/bot-02"))
    await expect_failure(
        registry.stub.GetAdapter(pb.GetAdapterRequest(name="acme/bot-02")),
        grpc.StatusCode.NOT_FOUND,
        "ADAPTER_NOT_FOUND",
    )


# -- versions, download, aliases, resolve ----------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
async def test_peft_adapters_round_trip_byte_for_byte(
    registry: RunningRegistry, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]], arch: str
) -> None:
    await register_models(registry, tiny_models)
    for i, (label, folder) in enumerate(sorted(tiny_adapters[arch].items())):
        name = f"acme/{label}"
        await registry.client.create_adapter(name, MODEL_NAMES[arch])
        config, weights = read_adapter(folder)
        version = await registry.client.upload(
            name, config, weights, expected_sha256=hashlib.sha256(weights).hexdigest()
        )
        assert version.version == 1 and version.state == pb.VERSION_STATE_READY
        assert version.weights_sha256 == hashlib.sha256(weights).hexdigest()
        assert version.digest.startswith("sha256:") and version.size_bytes == len(weights)
        assert version.base_model == MODEL_NAMES[arch]
        spec = json.loads(config)
        assert version.rank == max([spec["r"], *spec["rank_pattern"].values()])
        assert version.use_rslora == spec["use_rslora"]
        assert set(version.target_modules) == set(spec["target_modules"])
        downloaded = await registry.client.download(name)
        assert downloaded.weights == weights
        assert json.loads(downloaded.version.adapter_config_json) == spec
        if i == 0:
            # Resumable: the tail from an offset equals the file's tail.
            tail = await registry.client.download(f"{name}@1", offset=100)
            assert tail.weights == weights[100:]


async def test_versions_aliases_latest_and_resolve(
    registry: RunningRegistry, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    await register_models(registry, tiny_models)
    name = "acme/support-bot"
    await registry.client.create_adapter(name, "tiny-llama")
    uploads = []
    for label in ("qv-r4", "all-r8", "mlp-r32"):
        config, weights = read_adapter(tiny_adapters["llama"][label])
        uploads.append(await registry.client.upload(name, config, weights))
    assert [v.version for v in uploads] == [1, 2, 3]
    assert [v.version for v in await registry.client.list_versions(name)] == [3, 2, 1]
    assert (await registry.client.resolve(name)).version == 3
    assert (await registry.client.resolve(f"{name}@latest")).version == 3
    assert (await registry.client.resolve(f"{name}@2")).digest == uploads[1].digest
    assert (await registry.client.resolve(f"{name}@{uploads[0].digest}")).version == 1

    adapter = await registry.client.set_alias(name, "prod", 2)
    assert dict(adapter.aliases) == {"prod": 2}
    assert (await registry.client.resolve(f"{name}@prod")).version == 2
    await registry.client.set_alias(name, "prod", 1)  # aliases move
    assert (await registry.client.resolve(f"{name}@prod")).version == 1
    await expect_failure(
        registry.stub.SetAlias(pb.SetAliasRequest(adapter=name, alias="latest", version=1)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await expect_failure(
        registry.stub.SetAlias(pb.SetAliasRequest(adapter=name, alias="prod", version=9)), grpc.StatusCode.NOT_FOUND
    )
    await expect_failure(
        registry.stub.ResolveAdapter(pb.ResolveAdapterRequest(ref=f"{name}@staging")), grpc.StatusCode.NOT_FOUND
    )
    await expect_failure(
        registry.stub.ResolveAdapter(pb.ResolveAdapterRequest(ref="acme/unknown")),
        grpc.StatusCode.NOT_FOUND,
        "ADAPTER_NOT_FOUND",
    )
    await expect_failure(
        registry.stub.ResolveAdapter(pb.ResolveAdapterRequest(ref=f"{name}@sha256:{'0' * 64}")),
        grpc.StatusCode.NOT_FOUND,
    )
    for bad in (f"{name}@", f"{name}@0", f"{name}@sha256:xyz", "", "acme/Bad@1"):
        await expect_failure(
            registry.stub.ResolveAdapter(pb.ResolveAdapterRequest(ref=bad)), grpc.StatusCode.INVALID_ARGUMENT
        )

    # A version an alias points at cannot be deleted; latest moves back when the newest goes.
    await expect_failure(
        registry.stub.DeleteAdapterVersion(pb.DeleteAdapterVersionRequest(adapter=name, version=1)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    await registry.client.delete_version(name, 3)
    assert (await registry.client.resolve(name)).version == 2
    await registry.client.delete_alias(name, "prod")
    await registry.client.delete_version(name, 1)
    assert [v.version for v in await registry.client.list_versions(name)] == [2]
    # A new upload never reuses a number.
    config, weights = read_adapter(tiny_adapters["llama"]["o-down-r12"])
    assert (await registry.client.upload(name, config, weights)).version == 4

    await expect_failure(
        registry.stub.DeleteAdapter(pb.DeleteAdapterRequest(name=name)), grpc.StatusCode.FAILED_PRECONDITION
    )
    await registry.stub.DeleteAdapter(pb.DeleteAdapterRequest(name=name, force=True))
    await expect_failure(registry.stub.ResolveAdapter(pb.ResolveAdapterRequest(ref=name)), grpc.StatusCode.NOT_FOUND)


async def test_identical_uploads_share_one_blob_and_request_id_is_idempotent(
    registry: RunningRegistry, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    await register_models(registry, tiny_models)
    config, weights = read_adapter(tiny_adapters["llama"]["all-r8"])
    for name in ("acme/a", "acme/b"):
        await registry.client.create_adapter(name, "tiny-llama")
    first = await registry.client.upload("acme/a", config, weights, request_id="req-1")
    retry = await registry.client.upload("acme/a", config, weights, request_id="req-1")
    assert retry.version == first.version == 1 and retry.digest == first.digest
    other = await registry.client.upload("acme/b", config, weights)
    assert other.digest == first.digest
    assert len([k for k in blob_keys(registry) if "sha256/" in k]) == 1
    assert [v.version for v in await registry.client.list_versions("acme/a")] == [1]


async def test_twenty_parallel_uploads_get_versions_one_to_twenty(
    registry: RunningRegistry, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    await register_models(registry, tiny_models)
    await registry.client.create_adapter("acme/busy", "tiny-llama")
    config, weights = read_adapter(tiny_adapters["llama"]["qv-r4"])
    results = await asyncio.gather(*(registry.client.upload("acme/busy", config, weights) for _ in range(20)))
    assert sorted(v.version for v in results) == list(range(1, 21))
    assert [v.version for v in await registry.client.list_versions("acme/busy")] == list(range(20, 0, -1))


# -- bad input: typed status, nothing changed ----------------------------------------------------------
async def test_upload_protocol_violations_change_nothing(
    registry: RunningRegistry, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    await register_models(registry, tiny_models)
    name = "acme/guarded"
    await registry.client.create_adapter(name, "tiny-llama")
    config, weights = read_adapter(tiny_adapters["llama"]["qv-r4"])
    mistral_config, mistral_weights = read_adapter(tiny_adapters["mistral"]["qv-r4"])
    before = await snapshot(registry, name)
    size = len(weights)
    bad_streams = {
        "chunk before header": (
            [chunk(weights), header(name, config, size)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "UPLOAD_PROTOCOL",
        ),
        "empty stream": ([], grpc.StatusCode.INVALID_ARGUMENT, "UPLOAD_PROTOCOL"),
        "header twice": (
            [header(name, config, size), header(name, config, size), chunk(weights)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "UPLOAD_PROTOCOL",
        ),
        "truncated": (
            [header(name, config, size), chunk(weights[: size // 2])],
            grpc.StatusCode.INVALID_ARGUMENT,
            "SIZE_MISMATCH",
        ),
        "longer than declared": (
            [header(name, config, size - 1), chunk(weights)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "SIZE_MISMATCH",
        ),
        "huge declared size": ([header(name, config, 1 << 50), chunk(weights)], grpc.StatusCode.INVALID_ARGUMENT, None),
        "zero size": ([header(name, config, 0)], grpc.StatusCode.INVALID_ARGUMENT, None),
        "checksum mismatch": (
            [header(name, config, size, expected_sha256="0" * 64), chunk(weights)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "CHECKSUM_MISMATCH",
        ),
        "malformed sha": (
            [header(name, config, size, expected_sha256="xyz"), chunk(weights)],
            grpc.StatusCode.INVALID_ARGUMENT,
            None,
        ),
        "unknown adapter": (
            [header("acme/missing", config, size), chunk(weights)],
            grpc.StatusCode.NOT_FOUND,
            "ADAPTER_NOT_FOUND",
        ),
        "traversal name": (
            [header("../../etc/passwd", config, size), chunk(weights)],
            grpc.StatusCode.INVALID_ARGUMENT,
            None,
        ),
        "config not json": ([header(name, "{not json", size), chunk(weights)], grpc.StatusCode.INVALID_ARGUMENT, None),
        "not LORA": (
            [header(name, json.dumps(json.loads(config) | {"peft_type": "IA3"}), size), chunk(weights)],
            grpc.StatusCode.INVALID_ARGUMENT,
            None,
        ),
        "rank over max": (
            [header(name, json.dumps(json.loads(config) | {"r": 512}), size), chunk(weights)],
            None,
            None,
        ),
        "weights whose rank disagrees with the config": (
            [header(name, json.dumps(json.loads(config) | {"r": 8}), size), chunk(weights)],
            None,
            None,
        ),
        "garbage weights": ([header(name, config, 64), chunk(b"\xff" * 64)], grpc.StatusCode.INVALID_ARGUMENT, None),
        "header length beyond file": (
            [header(name, config, 16), chunk((10_000).to_bytes(8, "little") + b"{}      ")],
            grpc.StatusCode.INVALID_ARGUMENT,
            None,
        ),
    }
    for label, (messages, code, reason) in bad_streams.items():
        call = registry.stub.UploadAdapterVersion(upload_stream(*messages))
        if code is None:  # rank/shape incompatibilities may be INVALID_ARGUMENT or FAILED_PRECONDITION by design
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), label
            else:
                raise AssertionError(f"{label}: upload accepted")
        else:
            await expect_failure(call, code, reason)
        assert await snapshot(registry, name) == before, f"{label} changed state"
    # After all that, a good upload still works and gets version 1 (no number was consumed).
    ok = await registry.client.upload(name, mistral_config, mistral_weights)
    assert ok.version == 1


async def test_incompatible_base_model_is_failed_precondition(
    registry: RunningRegistry, tiny_adapters: dict[str, dict[str, Path]], tmp_path: Path
) -> None:
    from tests.fixtures.hf import model_config

    wide = model_config("llama", hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    await registry.client.register_base_model("wide-llama", json.dumps(wide.to_dict()))
    await registry.client.create_adapter("acme/wrong-base", "wide-llama")
    before = await snapshot(registry, "acme/wrong-base")
    config, weights = read_adapter(tiny_adapters["llama"]["all-r8"])
    await expect_failure(
        registry.stub.UploadAdapterVersion(
            upload_stream(header("acme/wrong-base", config, len(weights)), chunk(weights))
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ADAPTER_INCOMPATIBLE",
    )
    assert await snapshot(registry, "acme/wrong-base") == before


async def test_download_bad_offsets(
    registry: RunningRegistry, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    await register_models(registry, tiny_models)
    await registry.client.create_adapter("acme/dl", "tiny-llama")
    config, weights = read_adapter(tiny_adapters["llama"]["qv-r4"])
    await registry.client.upload("acme/dl", config, weights)
    for offset in (-1, len(weights) + 1):
        call = registry.stub.DownloadAdapterVersion(pb.DownloadAdapterVersionRequest(ref="acme/dl", offset=offset))
        await expect_failure(_drain(call), grpc.StatusCode.INVALID_ARGUMENT)
    end = registry.stub.DownloadAdapterVersion(pb.DownloadAdapterVersionRequest(ref="acme/dl", offset=len(weights)))
    messages = [m async for m in end]
    assert len(messages) == 1 and messages[0].chunk == b"" and messages[0].adapter_version.version == 1


async def _drain(call: object) -> None:
    async for _ in call:  # type: ignore[attr-defined]
        pass


async def test_client_detects_truncated_or_corrupted_blobs(
    registry: RunningRegistry, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    from loraplex.registry.errors import Unavailable

    if not registry.settings.blobs.startswith("file://"):
        pytest.skip("damages a blob file in place: local folder back end only")
    await register_models(registry, tiny_models)
    await registry.client.create_adapter("acme/fragile", "tiny-llama")
    config, weights = read_adapter(tiny_adapters["llama"]["all-r8"])
    version = await registry.client.upload("acme/fragile", config, weights)
    root = Path(registry.settings.blobs.removeprefix("file://"))
    blob = next(p for p in root.rglob(version.weights_sha256) if p.is_file())
    blob.write_bytes(weights[:-100])  # the disk lost the tail
    with pytest.raises(Unavailable) as short:
        await registry.client.download("acme/fragile")
    assert short.value.reason == "DOWNLOAD_INCOMPLETE"
    blob.write_bytes(weights[:-1] + bytes([weights[-1] ^ 0xFF]))  # same size, one byte flipped
    with pytest.raises(Unavailable) as corrupt:
        await registry.client.download("acme/fragile")
    assert corrupt.value.reason == "DOWNLOAD_CORRUPT"
