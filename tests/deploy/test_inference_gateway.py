"""The inference-gateway component: an InferencePool true to its published v1 schema, an endpoint picker it can
reach, and a picker configuration that reads loraplex's router-protocol metrics.

Why against a vendored CRD: InferencePool is not a built-in kind, so kubernetes-validate has no schema for it;
the CRD of gateway-api-inference-extension v1.6.0 (tests/deploy/data, Apache-2.0) is what a cluster would
validate it with. The picker's configuration is checked against the names llm-d router v0.10.0 accepts (plugin
types, parameter keys) and against loraplex's metric names, so a rename on either side fails here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import generate_latest

from loraplex.services.engine_metrics import EngineMetrics
from loraplex.services.settings import EngineSettings, from_sources
from tests.deploy import crd_schema
from tests.deploy.manifests import (
    COMPONENT,
    OVERLAYS,
    Manifest,
    Variant,
    container,
    env_values,
    generated,
    host_port,
    kubectl,
    named,
    of_kind,
    pod_labels,
    pod_spec,
    port_number,
    render,
    selects,
    volume,
    workloads,
)

CRD = Path(__file__).parent / "data" / "inference.networking.k8s.io_inferencepools.yaml"
POOL_API = "inference.networking.k8s.io/v1"
# loraplex's router-protocol metrics (issue 10, part 2), as the picker's core-metrics-extractor names its specs.
LORAPLEX_SPECS = {
    "queuedRequestsSpec": "loraplex_num_requests_waiting",
    "runningRequestsSpec": "loraplex_num_requests_running",
    "kvUsageSpec": "loraplex_kv_cache_usage_perc",
    "loraSpec": "loraplex_lora_requests_info",
    "cacheInfoSpec": "loraplex_cache_config_info",
}
# What llm-d router v0.10.0 accepts (cmd/epp/runner/runner.go registrations; the json tags of the
# core-metrics-extractor and metrics-data-source parameters).
KNOWN_PLUGIN_TYPES = {
    "metrics-data-source",
    "core-metrics-extractor",
    "lora-affinity-scorer",
    "queue-scorer",
    "kv-cache-utilization-scorer",
    "running-requests-size-scorer",
    "prefix-cache-scorer",
    "max-score-picker",
    "single-profile-handler",
}
EXTRACTOR_KEYS = {"engineLabelKey", "defaultEngine", "engineConfigs"}
ENGINE_CONFIG_KEYS = {
    "name",
    "queuedRequestsSpec",
    "runningRequestsSpec",
    "kvUsageSpec",
    "loraSpec",
    "cacheInfoSpec",
    "cacheBlockSizeLabelName",
    "cacheNumBlocksLabelName",
    "cacheBlockSizeSpec",
    "cacheNumBlocksSpec",
    "customMetrics",
}
DATA_SOURCE_KEYS = {
    "scheme",
    "path",
    "port",
    "insecureSkipVerify",
    "caCertPath",
    "clientCertPath",
    "clientKeyPath",
    "interval",
}
DEFAULT_ENGINE_LABEL = "llm-d.ai/engine-type"

needs_kubectl = pytest.mark.skipif(kubectl() is None, reason="kubectl is not on PATH (it renders deploy/k8s)")


def pool_schema() -> dict[str, Any]:
    return crd_schema.version_schema(crd_schema.load_crd(CRD), "v1")


def rendered(overlay: str) -> list[Manifest]:
    return render(Variant(overlay, gateway=True))


def the_pool(docs: list[Manifest]) -> Manifest:
    (pool,) = of_kind(docs, "InferencePool")
    return pool


def epp_config(docs: list[Manifest]) -> dict[str, Any]:
    """The picker configuration file exactly as the EPP reads it (from the ConfigMap its --config-file names)."""
    epp = named(docs, "Deployment", "loraplex-epp")
    c = container(epp, "epp")
    path = flag(c, "config-file")
    (mount,) = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    config_map = volume(epp, mount["name"])["configMap"]["name"]
    data = named(docs, "ConfigMap", config_map)["data"]
    return dict(yaml.safe_load(data[path[len(mount["mountPath"]) + 1 :]]))


def flag(c: dict[str, Any], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in c["args"] if a.startswith(f"--{name}=")]
    return str(value)


def plugin(config: dict[str, Any], plugin_type: str) -> dict[str, Any]:
    (found,) = [p for p in config["plugins"] if p["type"] == plugin_type]
    return dict(found)


def engine_settings(docs: list[Manifest]) -> EngineSettings:
    c = container(named(docs, "Deployment", "loraplex-engine"), "engine")
    settings: EngineSettings = from_sources(EngineSettings, None, env=env_values(docs, c, "from-a-secret"))
    return settings


# ------------------------------------------------------------------------------------------- the CRD itself
def test_vendored_crd_is_the_v1_inferencepool_definition() -> None:
    crd = crd_schema.load_crd(CRD)
    kubernetes_validate.validate(crd, "1.32.0", strict=True)
    assert crd["spec"]["group"] + "/v1" == POOL_API and crd["spec"]["names"]["kind"] == "InferencePool"
    assert crd["metadata"]["annotations"]["inference.networking.k8s.io/bundle-version"] == "v1.6.0"
    assert set(crd_schema.cel_rules(pool_schema())) <= set(crd_schema.CEL_RULES), "a CEL rule the test cannot check"


# ------------------------------------------------------------------------------------------- the pool
@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_inference_pool_conforms_to_the_published_v1_schema(overlay: str) -> None:
    pool = the_pool(rendered(overlay))
    assert pool["apiVersion"] == POOL_API
    assert crd_schema.errors(pool_schema(), pool) == []


@needs_kubectl
@pytest.mark.parametrize(
    ("mutate", "complaint"),
    [
        (lambda spec: spec.pop("targetPorts"), "'targetPorts' is a required property"),
        (lambda spec: spec.update(targetPort=[{"number": 8000}]), "Additional properties"),
        (lambda spec: spec["targetPorts"].append({"number": 8000}), "port number must be unique"),
        (lambda spec: spec["endpointPickerRef"].pop("port"), "port is required when kind is 'Service'"),
        (lambda spec: spec["endpointPickerRef"].update(failureMode="Retry"), "is not one of"),
        (lambda spec: spec["targetPorts"].__setitem__(0, {"number": 70000}), "is greater than the maximum"),
        (lambda spec: spec["selector"].update(matchLabels={}), "should be non-empty|does not have enough properties"),
    ],
    ids=[
        "no-target-ports",
        "misspelled-field",
        "duplicate-port",
        "service-without-port",
        "bad-enum",
        "port-range",
        "empty-selector",
    ],
)
def test_the_schema_check_rejects_broken_pools(mutate: Any, complaint: str) -> None:
    pool = the_pool(rendered("cpu"))
    mutate(pool["spec"])
    found = crd_schema.errors(pool_schema(), pool)
    assert any(re.search(complaint, e) for e in found), found


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pool_selects_only_the_engine_pods_on_their_http_port(overlay: str) -> None:
    docs = rendered(overlay)
    pool = the_pool(docs)
    selector = pool["spec"]["selector"]["matchLabels"]
    chosen = [w["metadata"]["name"] for w in workloads(docs) if selects(selector, pod_labels(w))]
    assert chosen == ["loraplex-engine"]
    engine = container(named(docs, "Deployment", "loraplex-engine"), "engine")
    http_port = host_port(engine_settings(docs).http_listen)[1]
    assert pool["spec"]["targetPorts"] == [{"number": http_port}]
    assert http_port == port_number(engine, "http")
    assert pool["spec"].get("appProtocol", "http") == "http", "the OpenAI door speaks HTTP/1.1"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_endpoint_picker_reference_reaches_the_picker_of_this_pool(overlay: str) -> None:
    docs = rendered(overlay)
    pool = the_pool(docs)
    ref = pool["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") == "Service" and ref.get("group", "") == ""
    service = named(docs, "Service", ref["name"])
    (svc_port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    epp = named(docs, "Deployment", "loraplex-epp")
    assert selects(service["spec"]["selector"], pod_labels(epp))
    c = container(epp, "epp")
    assert port_number(c, svc_port["targetPort"]) == int(flag(c, "grpc-port"))
    assert flag(c, "pool-name") == pool["metadata"]["name"]
    assert flag(c, "pool-group") == POOL_API.split("/")[0]
    health = int(flag(c, "grpc-health-port"))
    assert c["livenessProbe"]["grpc"] == {"port": health, "service": "liveness"}
    assert c["readinessProbe"]["grpc"] == {"port": health, "service": "readiness"}
    namespace_env = [e for e in c["env"] if e["name"] == "NAMESPACE"]
    assert namespace_env[0]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert pod_spec(epp)["serviceAccountName"] == "loraplex-epp"


@needs_kubectl
def test_picker_may_watch_pools_and_pods_in_its_namespace() -> None:
    docs = rendered("cpu")
    role = named(docs, "Role", "loraplex-epp")
    allowed = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("inference.networking.k8s.io", "inferencepools"), ("", "pods")} <= allowed
    for rule in role["rules"]:
        assert set(rule["verbs"]) == {"get", "list", "watch"}, "the picker only reads"
    binding = named(docs, "RoleBinding", "loraplex-epp")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "loraplex-epp", "namespace": "loraplex"}]


# ------------------------------------------------------------------------------------------- picker config
@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_picker_reads_loraplex_metric_names_from_the_engine_metrics_port(overlay: str) -> None:
    docs = rendered(overlay)
    config = epp_config(docs)
    assert generated(docs, "ConfigMap", "loraplex-epp-config")
    extractor = plugin(config, "core-metrics-extractor")["parameters"]
    label_key = extractor.get("engineLabelKey", DEFAULT_ENGINE_LABEL)
    engine_type = pod_labels(named(docs, "Deployment", "loraplex-engine"))[label_key]
    (mapping,) = [e for e in extractor["engineConfigs"] if e["name"] == engine_type]
    assert {k: v for k, v in mapping.items() if k != "name"} == LORAPLEX_SPECS
    assert extractor.get("defaultEngine") == engine_type, "unlabelled pods would be read with vLLM's names"
    source = plugin(config, "metrics-data-source")["parameters"]
    assert source["port"] == engine_settings(docs).metrics_port, "metrics live on --metrics-port, not the pool port"
    assert (source.get("scheme", "http"), source.get("path", "/metrics")) == ("http", "/metrics")
    (wired,) = config["dataLayer"]["sources"]
    assert wired == {"pluginRef": "metrics-data-source", "extractors": [{"pluginRef": "core-metrics-extractor"}]}


def test_picker_config_uses_only_names_the_router_accepts() -> None:
    config = yaml.safe_load((COMPONENT / "epp-config.yaml").read_text())
    assert (config["apiVersion"], config["kind"]) == ("llm-d.ai/v1alpha1", "EndpointPickerConfig")
    declared = {p.get("name", p["type"]) for p in config["plugins"]}
    assert {p["type"] for p in config["plugins"]} <= KNOWN_PLUGIN_TYPES
    assert set(plugin(config, "core-metrics-extractor")["parameters"]) <= EXTRACTOR_KEYS
    for engine in plugin(config, "core-metrics-extractor")["parameters"]["engineConfigs"]:
        assert set(engine) <= ENGINE_CONFIG_KEYS
    assert set(plugin(config, "metrics-data-source")["parameters"]) <= DATA_SOURCE_KEYS
    refs = [p["pluginRef"] for profile in config["schedulingProfiles"] for p in profile["plugins"]]
    refs += [s["pluginRef"] for s in config["dataLayer"]["sources"]]
    refs += [e["pluginRef"] for s in config["dataLayer"]["sources"] for e in s["extractors"]]
    assert set(refs) <= declared, f"undeclared plugin references: {set(refs) - declared}"
    (profile,) = config["schedulingProfiles"]
    weights = {p["pluginRef"]: p.get("weight", 1) for p in profile["plugins"]}
    assert weights["lora-affinity-scorer"] > 0 and weights["queue-scorer"] > 0, "LoRA affinity and queue depth"


def test_engine_exports_every_metric_the_picker_reads() -> None:
    exported = dict(re.findall(r"^# TYPE (\S+) (\S+)$", generate_latest(EngineMetrics().registry).decode(), re.M))
    wanted = set(LORAPLEX_SPECS.values())
    assert {name: exported.get(name) for name in wanted} == dict.fromkeys(wanted, "gauge")
