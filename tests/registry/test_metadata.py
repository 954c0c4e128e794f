"""Metadata semantics on both back ends: base models, adapters, listing, etags, aliases, resolve, deletes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from loraplex.registry.errors import (
    AdapterNotFound,
    AlreadyExists,
    BaseModelNotFound,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from loraplex.registry.service import RegistryService
from tests.fixtures.hf import read_adapter
from tests.registry.helpers import sha256, upload


def test_base_model_registration_is_idempotent(service: RegistryService, tiny_models: dict[str, Path]) -> None:
    text = (tiny_models["llama"] / "config.json").read_text()
    first = service.get_base_model("tiny-llama")
    reformatted = json.dumps(json.loads(text), indent=1, sort_keys=True)
    assert service.register_base_model("tiny-llama", reformatted) == first
    other = json.loads(text)
    other["hidden_size"] = 128
    with pytest.raises(AlreadyExists):
        service.register_base_model("tiny-llama", json.dumps(other))
    with pytest.raises(InvalidArgument):
        service.register_base_model("bad", json.dumps({**other, "model_type": "gpt2"}))
    with pytest.raises(BaseModelNotFound):
        service.get_base_model("nope")
    page = service.list_base_models(page_size=2)
    assert [m.name for m in page.items] == ["tiny-llama", "tiny-mistral"]
    rest = service.list_base_models(page_size=2, page_token=page.next_page_token)
    assert [m.name for m in rest.items] == ["tiny-qwen2"] and rest.next_page_token == ""


def test_create_adapter_rules(service: RegistryService) -> None:
    created = service.create_adapter("acme/a", "tiny-llama", "hello", {"team": "nlp"})
    assert (created.namespace, created.base_model, created.description) == ("acme", "tiny-llama", "hello")
    assert created.labels == {"team": "nlp"} and created.aliases == {} and created.latest_version is None
    assert created.create_time.tzinfo is not None
    assert service.get_adapter("acme/a") == created
    with pytest.raises(AlreadyExists):
        service.create_adapter("acme/a", "tiny-llama")
    with pytest.raises(BaseModelNotFound):
        service.create_adapter("acme/b", "nope")
    with pytest.raises(InvalidArgument):
        service.create_adapter("acme/c", "tiny-llama", labels={"Bad": "x"})
    with pytest.raises(InvalidArgument):
        service.create_adapter("ACME/c", "tiny-llama")
    with pytest.raises(AdapterNotFound):
        service.get_adapter("acme/zzz")


def test_pagination_and_filters(service: RegistryService) -> None:
    for i in range(25):
        ns = "acme" if i % 2 == 0 else "beta"
        base = "tiny-llama" if i % 3 else "tiny-qwen2"
        service.create_adapter(f"{ns}/a{i:02d}", base, labels={"parity": str(i % 2), "tier": "gold" if i < 5 else "x"})
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = service.list_adapters(page_size=10, page_token=token)
        seen += [a.name for a in page.items]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3 and seen == sorted(seen) and len(seen) == len(set(seen)) == 25

    qwen = service.list_adapters(page_size=100, base_model="tiny-qwen2").items
    assert {a.name for a in qwen} == {f"{'acme' if i % 2 == 0 else 'beta'}/a{i:02d}" for i in range(0, 25, 3)}
    gold_even = service.list_adapters(labels={"tier": "gold", "parity": "0"}).items
    assert [a.name for a in gold_even] == ["acme/a00", "acme/a02", "acme/a04"]
    beta = service.list_adapters(namespaces=["beta"]).items
    assert len(beta) == 12 and all(a.namespace == "beta" for a in beta)
    assert service.list_adapters(namespaces=[]).items == []
    assert len(service.list_adapters(namespaces=["beta", "acme"]).items) == 25

    first = service.list_adapters(page_size=5, namespaces=["acme"])
    with pytest.raises(InvalidArgument):  # a token is bound to the filters it was issued for
        service.list_adapters(page_size=5, page_token=first.next_page_token, namespaces=["beta"])
    for bad in ("garbage", "eyJrIjoieCJ9", "!" * 10):
        with pytest.raises(InvalidArgument):
            service.list_adapters(page_token=bad)
    for size in (-1, 1001):
        with pytest.raises(InvalidArgument):
            service.list_adapters(page_size=size)
    assert len(service.list_adapters(page_size=0).items) == 25  # 0 -> default (100)


def test_update_with_etags(service: RegistryService) -> None:
    created = service.create_adapter("acme/u", "tiny-llama", "v1", {"a": "1"})
    updated = service.update_adapter("acme/u", paths=["description"], description="v2", etag=created.etag)
    assert updated.description == "v2" and updated.labels == {"a": "1"}
    assert updated.etag != created.etag and updated.update_time >= created.update_time
    with pytest.raises(Conflict) as info:
        service.update_adapter("acme/u", paths=["description"], description="lost", etag=created.etag)
    assert info.value.reason == "ETAG_MISMATCH"
    relabeled = service.update_adapter("acme/u", paths=["labels"], labels={"b": "2"})
    assert relabeled.labels == {"b": "2"} and relabeled.description == "v2"
    for paths in ([], ["name"], ["description", "base_model"]):
        with pytest.raises(InvalidArgument):
            service.update_adapter("acme/u", paths=paths, description="x")
    assert service.get_adapter("acme/u") == relabeled


def test_aliases_latest_and_resolve(service: RegistryService, tiny_adapters: dict[str, dict[str, Path]]) -> None:
    service.create_adapter("acme/r", "tiny-mistral")
    with pytest.raises(NotFound) as info:
        service.resolve("acme/r")
    assert info.value.reason == "VERSION_NOT_FOUND"
    payloads = [read_adapter(tiny_adapters["mistral"][n]) for n in ("qv-r4", "all-r8", "mlp-r32")]
    versions = [upload(service, "acme/r", c, w) for c, w in payloads]
    assert service.resolve("acme/r").version == 3
    assert service.resolve("acme/r@latest").version == 3
    assert service.resolve("acme/r@2") == versions[1]
    assert service.resolve(f"acme/r@{versions[0].digest}").version == 1

    adapter = service.set_alias("acme/r", "prod", 2)
    assert adapter.aliases == {"prod": 2}
    assert service.resolve("acme/r@prod").version == 2
    assert service.get_version("acme/r", 2).aliases == ("prod",)
    assert service.set_alias("acme/r", "prod", 1).aliases == {"prod": 1}  # re-point
    assert service.resolve("acme/r@prod").version == 1
    with pytest.raises(InvalidArgument):
        service.set_alias("acme/r", "latest", 1)
    with pytest.raises(NotFound) as info:
        service.set_alias("acme/r", "canary", 9)
    assert info.value.reason == "VERSION_NOT_FOUND"

    with pytest.raises(FailedPrecondition):
        service.delete_version("acme/r", 1)  # pinned by prod
    service.delete_version("acme/r", 3)
    assert service.resolve("acme/r").version == 2  # latest moved back
    assert service.get_adapter("acme/r").latest_version == 2
    with pytest.raises(NotFound) as info:
        service.get_version("acme/r", 3)
    assert info.value.reason == "VERSION_NOT_FOUND"
    # Numbers are never reused: the next upload is 4, not 3.
    assert upload(service, "acme/r", *payloads[2]).version == 4

    service.delete_alias("acme/r", "prod")
    with pytest.raises(NotFound) as info:
        service.resolve("acme/r@prod")
    assert info.value.reason == "ALIAS_NOT_FOUND"
    with pytest.raises(NotFound) as info:
        service.delete_alias("acme/r", "prod")
    assert info.value.reason == "ALIAS_NOT_FOUND"
    with pytest.raises(AdapterNotFound) as info:
        service.resolve("acme/none@prod")
    assert info.value.reason == "ADAPTER_NOT_FOUND"
    with pytest.raises(NotFound) as info:
        service.resolve("acme/r@sha256:" + "0" * 64)
    assert info.value.reason == "VERSION_NOT_FOUND"
    with pytest.raises(NotFound):
        service.resolve("acme/r@3")


def test_list_versions_newest_first_with_pages(
    service: RegistryService, tiny_adapters: dict[str, dict[str, Path]]
) -> None:
    service.create_adapter("acme/v", "tiny-llama")
    config, weights = read_adapter(tiny_adapters["llama"]["qv-r4"])
    for _ in range(5):
        upload(service, "acme/v", config, weights)
    first = service.list_versions("acme/v", page_size=2)
    second = service.list_versions("acme/v", page_size=2, page_token=first.next_page_token)
    third = service.list_versions("acme/v", page_size=2, page_token=second.next_page_token)
    assert [[v.version for v in p.items] for p in (first, second, third)] == [[5, 4], [3, 2], [1]]
    assert third.next_page_token == ""
    service.create_adapter("acme/w", "tiny-llama")
    with pytest.raises(InvalidArgument):  # tokens are per adapter
        service.list_versions("acme/w", page_token=first.next_page_token)


def test_delete_adapter(service: RegistryService, tiny_adapters: dict[str, dict[str, Path]]) -> None:
    created = service.create_adapter("acme/d", "tiny-llama")
    config, weights = read_adapter(tiny_adapters["llama"]["qv-r4"])
    upload(service, "acme/d", config, weights)
    service.set_alias("acme/d", "prod", 1)
    with pytest.raises(FailedPrecondition):
        service.delete_adapter("acme/d")
    with pytest.raises(Conflict):
        service.delete_adapter("acme/d", etag=created.etag, force=True)  # alias changed the etag
    service.delete_adapter("acme/d", force=True)
    with pytest.raises(AdapterNotFound):
        service.get_adapter("acme/d")
    assert service.blobs.exists(f"sha256/{sha256(weights)}")  # left for gc
    again = service.create_adapter("acme/d", "tiny-llama")  # the name is free again, history gone
    assert again.latest_version is None
    assert upload(service, "acme/d", config, weights).version == 1


def test_resolve_timing_smoke(service: RegistryService, tiny_adapters: dict[str, dict[str, Path]]) -> None:
    """Resolve stays a couple of indexed queries; prints p50/p99 (no assertion on speed)."""
    config, weights = read_adapter(tiny_adapters["llama"]["qv-r4"])
    for i in range(40):
        service.create_adapter(f"ns{i % 4}/a{i}", "tiny-llama")
    upload(service, "ns0/a0", config, weights)
    service.set_alias("ns0/a0", "prod", 1)
    samples = []
    for i in range(200):
        ref = ("ns0/a0", "ns0/a0@1", "ns0/a0@prod")[i % 3]
        start = time.perf_counter()
        service.resolve(ref)
        samples.append(time.perf_counter() - start)
    samples.sort()
    print(f"resolve p50={samples[100] * 1e3:.2f}ms p99={samples[197] * 1e3:.2f}ms")
