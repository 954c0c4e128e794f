"""Uploads end to end on both back ends: byte-exact round trips, idempotency, and concurrent numbering."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from loraplex.registry.digest import version_digest
from loraplex.registry.entities import VersionState
from loraplex.registry.errors import AlreadyExists, InvalidArgument
from loraplex.registry.service import RegistryService
from tests.fixtures.hf import ADAPTER_ZOO, ARCHITECTURES, read_adapter
from tests.registry.helpers import sha256, upload


def test_every_arch_round_trips_byte_for_byte(
    service: RegistryService, tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    for arch in ARCHITECTURES:
        name = f"acme/{arch}"
        service.create_adapter(name, f"tiny-{arch}")
        for number, adapter_name in enumerate(ADAPTER_ZOO, start=1):
            config, weights = read_adapter(tiny_adapters[arch][adapter_name])
            version = upload(service, name, config, weights, expected_sha256=sha256(weights))
            assert version.version == number
            assert version.state is VersionState.READY
            assert version.weights_sha256 == sha256(weights)
            assert version.digest == version_digest(config, sha256(weights))
            assert version.size_bytes == len(weights)
            assert version.base_model == f"tiny-{arch}"
            assert version.adapter_config_json == config
            resolved, chunks = service.open_download(f"{name}@{number}")
            assert resolved == version
            assert sha256(b"".join(chunks)) == sha256(weights)
        assert service.get_adapter(name).latest_version == len(ADAPTER_ZOO)


def test_ranged_download(service: RegistryService, tiny_adapters: dict[str, dict[str, Path]]) -> None:
    config, weights = read_adapter(tiny_adapters["llama"]["all-r64"])
    service.create_adapter("acme/x", "tiny-llama")
    upload(service, "acme/x", config, weights)
    for offset in (0, 1, 12345, len(weights) - 1):
        _, chunks = service.open_download("acme/x", offset)
        assert b"".join(chunks) == weights[offset:]
    _, chunks = service.open_download("acme/x", len(weights))
    assert list(chunks) == []
    for bad in (-1, len(weights) + 1):
        with pytest.raises(InvalidArgument) as info:
            service.open_download("acme/x", bad)
        assert info.value.reason == "INVALID_OFFSET"


def test_request_id_makes_upload_idempotent(
    service: RegistryService, tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    config, weights = read_adapter(tiny_adapters["llama"]["qv-r4"])
    service.create_adapter("acme/idem", "tiny-llama")
    first = upload(service, "acme/idem", config, weights, request_id="req-1")
    plan = service.begin_upload("acme/idem", config, len(weights), request_id="req-1")
    assert plan.existing == first
    # A retry that re-sends the bytes anyway still lands on the same version.
    spool = service.new_spool_file()
    spool.write_bytes(weights)
    assert service.finish_upload(plan, spool, sha256(weights)) == first
    plan_fresh = service.begin_upload("acme/idem", config, len(weights), request_id="req-1")
    object.__setattr__(plan_fresh, "existing", None)  # simulate a retry racing the first commit
    assert service.finish_upload(plan_fresh, spool, sha256(weights)).version == first.version
    # The same request_id with different content is refused, not silently mapped.
    other_config, other_weights = read_adapter(tiny_adapters["llama"]["all-r8"])
    other_plan = service.begin_upload("acme/idem", other_config, len(other_weights), request_id="req-2")
    spool.write_bytes(other_weights)
    object.__setattr__(other_plan, "request_id", "req-1")
    with pytest.raises(AlreadyExists) as info:
        service.finish_upload(other_plan, spool, sha256(other_weights))
    assert info.value.reason == "REQUEST_ID_REUSED"
    assert [v.version for v in service.list_versions("acme/idem").items] == [1]


def test_twenty_concurrent_uploads_number_one_to_twenty(
    service: RegistryService, tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    service.create_adapter("acme/busy", "tiny-llama")
    adapters = list(ADAPTER_ZOO)
    payloads = [read_adapter(tiny_adapters["llama"][adapters[i % len(adapters)]]) for i in range(20)]
    plans = [service.begin_upload("acme/busy", c, len(w)) for c, w in payloads]
    spools = []
    for _, weights in payloads:
        spool = service.new_spool_file()
        spool.write_bytes(weights)
        spools.append(spool)
    barrier = threading.Barrier(20)
    results: list[int] = []
    errors: list[BaseException] = []

    def finish(i: int) -> None:
        barrier.wait()
        try:
            results.append(service.finish_upload(plans[i], spools[i], sha256(payloads[i][1])).version)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert sorted(results) == list(range(1, 21))
    listed = [v.version for v in service.list_versions("acme/busy", page_size=50).items]
    assert listed == list(range(20, 0, -1))


def test_same_weights_are_stored_once(service: RegistryService, tiny_adapters: dict[str, dict[str, Path]]) -> None:
    config, weights = read_adapter(tiny_adapters["qwen2"]["mlp-r32"])
    service.create_adapter("acme/a", "tiny-qwen2")
    service.create_adapter("acme/b", "tiny-qwen2")
    v1 = upload(service, "acme/a", config, weights)
    v2 = upload(service, "acme/b", config, weights)
    assert v1.blob_key == v2.blob_key == f"sha256/{sha256(weights)}"
    assert [b.key for b in service.blobs.list("sha256/")] == [v1.blob_key]
