"""Uploads through a real gRPC server on both back ends: content checks while streaming, request_id reuse.

Why through the server: the checks that matter happen in the servicer's receive loop (NaN/Inf refused as the
bytes arrive, before the client has sent the rest) and in the upload plan (a reused request_id is never mapped
onto another upload's version), on SQLite + local blobs and on PostgreSQL + S3 alike.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from loraplex.registry.v1 import registry_service_pb2 as pb
from tests.fixtures.hf import read_adapter
from tests.services.conftest import RunningRegistry
from tests.services.rpc_helpers import expect_failure
from tests.services.test_registry_rpc import chunk, header, register_models, snapshot, upload_stream

CHUNK = 4096


def _poisoned(weights: bytes, value: float) -> tuple[bytes, int]:
    """``weights`` with ``value`` written over the first element of the data section, and that byte offset."""
    (n,) = struct.unpack("<Q", weights[:8])
    start = 8 + n
    return weights[:start] + struct.pack("<f", value) + weights[start + 4 :], start


async def test_non_finite_weights_are_refused_while_the_rest_is_still_unsent(
    registry: RunningRegistry, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    await register_models(registry, tiny_models)
    await registry.client.create_adapter("acme/nan", "tiny-llama")
    before = await snapshot(registry, "acme/nan")
    config, weights = read_adapter(tiny_adapters["llama"]["all-r64"])
    bad, offset = _poisoned(weights, float("nan"))
    assert len(bad) > 8 * CHUNK, "the adapter must be big enough to hold bytes back"
    held_back = asyncio.Event()  # never set: the client never sends the rest

    async def messages() -> AsyncIterator[pb.UploadAdapterVersionRequest]:
        yield header("acme/nan", config, len(bad))
        end = (offset // CHUNK + 1) * CHUNK  # up to and including the chunk holding the NaN
        for i in range(0, end, CHUNK):
            yield chunk(bad[i : i + CHUNK])
        await held_back.wait()

    failure = await expect_failure(
        registry.stub.UploadAdapterVersion(messages(), timeout=20),
        grpc.StatusCode.INVALID_ARGUMENT,
        "NON_FINITE_WEIGHTS",
    )
    assert "non-finite" in failure.message and "lora_A" in failure.message
    assert await snapshot(registry, "acme/nan") == before
    inf, _ = _poisoned(weights, float("inf"))
    await expect_failure(
        registry.stub.UploadAdapterVersion(upload_stream(header("acme/nan", config, len(inf)), chunk(inf))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "NON_FINITE_WEIGHTS",
    )
    assert (await registry.client.upload("acme/nan", config, weights)).version == 1


async def test_trailing_bytes_and_huge_scales_are_invalid_argument(
    registry: RunningRegistry, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    await register_models(registry, tiny_models)
    await registry.client.create_adapter("acme/odd", "tiny-qwen2")
    before = await snapshot(registry, "acme/odd")
    config, weights = read_adapter(tiny_adapters["qwen2"]["attn-r16-rs"])
    padded = weights + bytes(8)
    failure = await expect_failure(
        registry.stub.UploadAdapterVersion(upload_stream(header("acme/odd", config, len(padded)), chunk(padded))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ADAPTER",
    )
    assert "after its last tensor" in failure.message
    huge = json.dumps(json.loads(config) | {"lora_alpha": 1e308})
    failure = await expect_failure(
        registry.stub.UploadAdapterVersion(upload_stream(header("acme/odd", huge, len(weights)), chunk(weights))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "LORA_SCALE_OUT_OF_RANGE",
    )
    assert "sqrt(16)" in failure.message
    assert await snapshot(registry, "acme/odd") == before


async def test_request_id_reused_for_other_content_is_already_exists(
    registry: RunningRegistry, tiny_models: dict[str, Path], tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    await register_models(registry, tiny_models)
    name = "acme/idem"
    await registry.client.create_adapter(name, "tiny-llama")
    config, weights = read_adapter(tiny_adapters["llama"]["qv-r4"])
    first = await registry.client.upload(name, config, weights, request_id="req-1")
    before = await snapshot(registry, name)

    # Same content again (with or without its sha256 declared, config re-serialized): the same version.
    same_config = json.dumps(json.loads(config), indent=4)
    again = await registry.client.upload(name, same_config, weights, request_id="req-1")
    declared = await registry.client.upload(
        name, config, weights, request_id="req-1", expected_sha256=hashlib.sha256(weights).hexdigest()
    )
    assert again.version == declared.version == first.version and again.digest == first.digest

    other_config, other_weights = read_adapter(tiny_adapters["llama"]["all-r8"])
    flipped = bytearray(weights)
    flipped[-1] ^= 0x01  # same size and config, one weight's lowest mantissa bit differs
    reuses = {
        "other config and weights": (other_config, other_weights),
        "same config, other weights of the same size": (config, bytes(flipped)),
        "other config, same weights": (json.dumps(json.loads(config) | {"lora_alpha": 4}), weights),
    }
    for label, (cfg, data) in reuses.items():
        failure = await expect_failure(
            registry.stub.UploadAdapterVersion(
                upload_stream(header(name, cfg, len(data), request_id="req-1"), chunk(data))
            ),
            grpc.StatusCode.ALREADY_EXISTS,
            "REQUEST_ID_REUSED",
        )
        assert "req-1" in failure.message, label
        assert await snapshot(registry, name) == before, label
    # A declared sha256 that differs from the first upload's is refused before any byte is read.
    await expect_failure(
        registry.stub.UploadAdapterVersion(
            upload_stream(header(name, config, len(weights), request_id="req-1", expected_sha256="0" * 64))
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )
    # A fresh request_id still uploads normally.
    assert (await registry.client.upload(name, other_config, other_weights, request_id="req-2")).version == 2


async def test_dora_adapter_uploads_through_the_server(
    registry: RunningRegistry, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    from tests.fixtures.hf import ALL_LINEAR, AdapterSpec, build_adapter

    await register_models(registry, tiny_models)
    folder = build_adapter(
        tiny_models["mistral"], tmp_path / "dora", AdapterSpec(r=8, target_modules=tuple(ALL_LINEAR), use_dora=True)
    )
    config, weights = read_adapter(folder)
    await registry.client.create_adapter("acme/dora", "tiny-mistral")
    version = await registry.client.upload("acme/dora", config, weights)
    assert version.version == 1 and json.loads(version.adapter_config_json)["use_dora"] is True
    head = json.dumps(json.loads(config) | {"target_modules": ["q_proj", "lm_head"]})
    failure = await expect_failure(
        registry.stub.UploadAdapterVersion(upload_stream(header("acme/dora", head, len(weights)), chunk(weights))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ADAPTER",
    )
    assert "DoRA (use_dora=true) on lm_head is not supported" in failure.message
