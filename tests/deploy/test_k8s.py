"""deploy/k8s rendered with ``kubectl kustomize`` and held to what the cluster and the code expect.

Why offline: no cluster runs here (or in CI). Every overlay, with and without the inference-gateway component,
is rendered by the real kustomize inside kubectl; every built-in kind is validated with ``kubernetes-validate
--strict`` against the pinned Kubernetes version's OpenAPI schemas (unknown fields fail, as they would under
``kubectl apply``'s strict field validation); and the containers' args and env are parsed by loraplex's own CLI
and settings classes, so a manifest can only name settings that exist, with values that parse. The wiring a
typo would break silently (ports, probes, Secret keys, mounts, selectors) is checked end to end.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, all_versions

from loraplex.services.auth import TokenAuthority
from loraplex.services.cli import build_parser
from loraplex.services.settings import ClientSettings, EngineSettings, RegistrySettings, from_sources
from tests.deploy.manifests import (
    NAMESPACE,
    OVERLAYS,
    ROOT,
    VARIANTS,
    Manifest,
    Variant,
    container,
    containers,
    env_values,
    generated,
    host_port,
    kubectl,
    mount_for,
    named,
    of_kind,
    pod_labels,
    pod_spec,
    port_number,
    render,
    secret_value,
    selects,
    workloads,
)
from tests.e2e.test_compose import env_names

pytestmark = pytest.mark.skipif(kubectl() is None, reason="kubectl is not on PATH (it renders deploy/k8s)")

# The oldest Kubernetes these manifests promise to work on: native gRPC probes (GA 1.27) and the preStop
# `sleep` action (on by default since 1.30) are both in its schemas.
KUBERNETES_VERSION = "1.32.0"
# The subcommands our containers run, and the settings class each one reads.
COMMANDS: dict[tuple[str, str], type[Any]] = {
    ("registry", "serve"): RegistrySettings,
    ("engine", "serve"): EngineSettings,
    ("models", "register"): ClientSettings,
}
# Variables outside loraplex's settings that a command's libraries read (libpq, boto3).
FOREIGN_ENV: dict[type[Any], set[str]] = {
    RegistrySettings: {"PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"},
    EngineSettings: set(),
    ClientSettings: set(),
}
FROM_SECRET = "value-from-a-secret"
ALL_RENDERINGS = [Variant("base"), *VARIANTS]


def variant_ids(variants: list[Variant]) -> list[str]:
    return [v.id for v in variants]


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def compose_images() -> dict[str, str]:
    """Image repository → Dockerfile, from compose.yaml's build sections (the names `docker compose build` tags)."""
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    images = {}
    for service in services.values():
        if "build" in service:
            match = re.fullmatch(r"\$\{[A-Z_]+:-([^}:]+):[^}]*\}", service["image"])
            assert match, f"compose image {service['image']!r} has no default name"
            images[match.group(1)] = service["build"]["dockerfile"]
    return images


def dockerfile_uid(dockerfile: str) -> int:
    users = re.findall(r"^USER\s+(\d+)(?::\d+)?\s*$", (ROOT / dockerfile).read_text(), re.M)
    assert users, f"{dockerfile} has no numeric USER"
    return int(users[-1])


def image_repo(c: dict[str, Any]) -> str:
    return str(c["image"]).rsplit(":", 1)[0]


def loraplex_containers(docs: list[Manifest]) -> list[tuple[Manifest, dict[str, Any]]]:
    ours = set(compose_images())
    return [(w, c) for w in workloads(docs) for c in containers(w) if image_repo(c) in ours]


def parse_args(args: list[str]) -> argparse.Namespace:
    try:
        parsed: argparse.Namespace = build_parser().parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"the loraplex CLI rejects args {args}") from exc
    return parsed


def cli_settings(docs: list[Manifest], c: dict[str, Any]) -> Any:
    """Check one container against the real CLI and settings and return the settings it would run with."""
    args = [str(a) for a in c.get("args", [])]
    assert not c.get("command"), f"{c['name']}: keep the image's `loraplex` entry point; pass args only"
    cls = COMMANDS.get((args[0], args[1]) if len(args) > 1 else ("", ""))
    assert cls is not None, f"{c['name']}: runs {args[:2]}, not one of {sorted(COMMANDS)}"
    parsed = parse_args(args)
    env = env_values(docs, c, FROM_SECRET)
    ours = {name for name in env if name.startswith("LORAPLEX_")}
    unknown = ours - env_names(cls)
    assert not unknown, f"{c['name']} sets {sorted(unknown)}, which {cls.__name__} does not read"
    foreign = set(env) - ours - FOREIGN_ENV[cls]
    assert not foreign, f"{c['name']} sets {sorted(foreign)}, which nothing in `loraplex {' '.join(args[:2])}` reads"
    return from_sources(cls, parsed, env=env)


def the_registry(docs: list[Manifest]) -> tuple[Manifest, dict[str, Any], RegistrySettings]:
    workload = named(docs, "Deployment", "loraplex-registry")
    c = container(workload, "registry")
    return workload, c, cli_settings(docs, c)


def the_engine(docs: list[Manifest]) -> tuple[Manifest, dict[str, Any], EngineSettings]:
    workload = named(docs, "Deployment", "loraplex-engine")
    c = container(workload, "engine")
    return workload, c, cli_settings(docs, c)


def env_source(c: dict[str, Any], name: str) -> dict[str, Any]:
    (item,) = [e for e in c.get("env", []) if e["name"] == name]
    return dict(item)


def secret_ref(c: dict[str, Any], name: str) -> tuple[str, str]:
    ref = env_source(c, name).get("valueFrom", {}).get("secretKeyRef")
    assert ref, f"{c['name']}: {name} must come from a Secret, not a literal"
    return str(ref["name"]), str(ref["key"])


def prestop_seconds(c: dict[str, Any]) -> int:
    return int(c["lifecycle"]["preStop"]["sleep"]["seconds"])


def quantity_bytes(quantity: str) -> int:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "k": 1000, "M": 1000**2, "G": 1000**3}
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity)
    assert match, f"unsupported quantity {quantity!r}"
    return int(match.group(1)) * units.get(match.group(2), 1)


def assert_secret_file(workload: Manifest, c: dict[str, Any], path: str) -> tuple[str, str]:
    """``path`` is a file of a Secret volume (listed in its items); returns (secret name, key)."""
    mount, vol = mount_for(workload, c, path)
    assert "secret" in vol, f"{path} is not on a Secret volume"
    relative = path[len(mount["mountPath"]) :].lstrip("/")
    keys = {item["path"]: item["key"] for item in vol["secret"].get("items", [])}
    assert relative in keys, f"{path}: the Secret volume does not project {relative} (items: {sorted(keys)})"
    return vol["secret"]["secretName"], keys[relative]


# ------------------------------------------------------------------------------------------- rendering
def test_kubernetes_validate_ships_the_pinned_version() -> None:
    assert KUBERNETES_VERSION in all_versions()


@pytest.mark.parametrize("variant", ALL_RENDERINGS, ids=variant_ids(ALL_RENDERINGS))
def test_every_variant_renders_distinct_named_objects(variant: Variant) -> None:
    docs = render(variant)
    keys = [(d["apiVersion"], d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), "kustomize emitted the same object twice"
    assert {"Deployment", "Service", "PodDisruptionBudget"} <= {k for _, k, _ in keys}
    assert any(k == "InferencePool" for _, k, _ in keys) == variant.gateway


@pytest.mark.parametrize("variant", ALL_RENDERINGS, ids=variant_ids(ALL_RENDERINGS))
def test_builtin_kinds_validate_strictly(variant: Variant) -> None:
    for doc in render(variant):
        if doc["apiVersion"].startswith("inference.networking.k8s.io/"):
            continue  # a CRD kind: tests/deploy/test_inference_gateway.py checks it against its published schema
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except SchemaNotFoundError as exc:
            raise AssertionError(f"{doc['kind']} ({doc['apiVersion']}) is neither built in nor checked") from exc
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}") from exc


def test_strict_validation_catches_a_misspelled_field() -> None:
    engine = named(render(Variant("cpu")), "Deployment", "loraplex-engine")
    container(engine, "engine")["readinessProbe"]["httpGet"]["paht"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(engine, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_ids(VARIANTS))
def test_overlays_put_everything_in_one_namespace(variant: Variant) -> None:
    docs = render(variant)
    assert [d["metadata"]["name"] for d in of_kind(docs, "Namespace")] == [NAMESPACE]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"
    for binding in of_kind(docs, "RoleBinding"):
        for subject in binding["subjects"]:
            assert subject.get("namespace") == NAMESPACE, "a ServiceAccount subject needs its namespace"


# ------------------------------------------------------------------------------------------- real settings
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_ids(VARIANTS))
def test_loraplex_containers_name_only_real_cli_settings(variant: Variant) -> None:
    docs = render(variant)
    checked = loraplex_containers(docs)
    assert {w["metadata"]["name"] for w, _ in checked} >= {"loraplex-registry", "loraplex-engine"}
    for _, c in checked:
        cli_settings(docs, c)


@pytest.mark.parametrize(
    ("env", "args"),
    [
        ({"name": "LORAPLEX_NOT_A_SETTING", "value": "1"}, None),
        ({"name": "LORAPLEX_DRAIN_SECONDS", "value": "soon"}, None),
        ({"name": "AWS_ACCESS_KEY_ID", "value": "x"}, None),
        (None, ["engine", "serve", "--no-such-flag"]),
        (None, ["engine", "run"]),
    ],
    ids=["unknown-env", "unparsable-value", "foreign-env", "unknown-flag", "unknown-command"],
)
def test_the_settings_check_rejects_what_the_cli_would(env: dict[str, str] | None, args: list[str] | None) -> None:
    docs = render(Variant("cpu"))
    c = container(named(docs, "Deployment", "loraplex-engine"), "engine")
    if env is not None:
        c["env"] = [*c["env"], env]
    if args is not None:
        c["args"] = args
    with pytest.raises(Exception, match=r"does not read|nothing in|cannot parse|rejects|not one of"):
        cli_settings(docs, c)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_the_projects_dockerfiles_at_its_version(overlay: str) -> None:
    docs = render(Variant(overlay))
    built = compose_images()
    want_engine = "loraplex-engine-cuda" if overlay == "gpu" else "loraplex-engine"
    assert built[want_engine] == ("docker/engine-cuda.Dockerfile" if overlay == "gpu" else "docker/engine.Dockerfile")
    for workload, c in loraplex_containers(docs):
        assert c["image"] == f"{image_repo(c)}:{project_version()}", f"{c['name']}: pin the release tag"
        assert c.get("imagePullPolicy") == "IfNotPresent", "locally loaded images (kind load) must not be pulled"
        command = tuple(c["args"][:2])
        want = want_engine if command == ("engine", "serve") else "loraplex-registry"
        assert image_repo(c) == want, f"{workload['metadata']['name']}: {c['image']}"


# ------------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_registry_is_stateless_probed_by_grpc_health_and_reads_secrets(overlay: str) -> None:
    docs = render(Variant(overlay))
    workload, c, s = the_registry(docs)
    assert workload["spec"]["replicas"] == 2
    assert not pod_spec(workload).get("volumeClaimTemplates") and all(
        "persistentVolumeClaim" not in v for v in pod_spec(workload).get("volumes", [])
    ), "the registry keeps no state of its own"
    host, port = host_port(s.listen)
    assert host == "0.0.0.0" and port == port_number(c, "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port, f"{probe} must call grpc.health.v1 on the serving port"
    secret_ref(c, "LORAPLEX_DB")
    for name in ("LORAPLEX_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD"):
        secret_ref(c, name)
    assert s.blobs.startswith("s3://") and s.db.startswith(("postgresql", FROM_SECRET))
    assert s.tokens_file and not s.insecure, "auth stays on beyond loopback"
    assert_secret_file(workload, c, s.tokens_file)
    assert s.spool_dir
    _, spool = mount_for(workload, c, s.spool_dir)
    assert quantity_bytes(spool["emptyDir"]["sizeLimit"]) >= 2 * s.max_adapter_bytes, "room for two uploads"
    assert pod_spec(workload)["terminationGracePeriodSeconds"] >= prestop_seconds(c) + s.drain_seconds


# ------------------------------------------------------------------------------------------- engine
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engine_serves_three_ports_that_probes_and_service_use(overlay: str) -> None:
    docs = render(Variant(overlay))
    _, c, s = the_engine(docs)
    grpc_host, grpc_port = host_port(s.listen)
    http_host, http_port = host_port(s.http_listen)
    assert (grpc_host, http_host, s.metrics_host) == ("0.0.0.0",) * 3, "every door must be reachable from the pod IP"
    assert (port_number(c, "grpc"), port_number(c, "http"), port_number(c, "metrics")) == (
        grpc_port,
        http_port,
        s.metrics_port,
    )
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["port"] in ("http", http_port)
    assert c["livenessProbe"]["grpc"]["port"] == grpc_port
    assert c["startupProbe"]["grpc"]["port"] == grpc_port, "loading a model must not trip the liveness probe"
    service = named(docs, "Service", "loraplex-engine")
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        "grpc": "grpc",
        "http": "http",
        "metrics": "metrics",
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engine_drains_within_its_grace_period(overlay: str) -> None:
    workload, c, s = the_engine(render(Variant(overlay)))
    assert s.drain_seconds > 0
    assert pod_spec(workload)["terminationGracePeriodSeconds"] >= prestop_seconds(c) + s.drain_seconds
    liveness = c["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > s.drain_seconds, (
        "a draining engine (gRPC health NOT_SERVING) would be restarted by its liveness probe"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engine_mounts_its_model_and_reaches_the_registry(overlay: str) -> None:
    docs = render(Variant(overlay))
    workload, c, s = the_engine(docs)
    mount, model = mount_for(workload, c, s.model)
    assert mount["mountPath"] == s.model and mount.get("readOnly") is True
    assert ("hostPath" in model) == (overlay == "dev"), "only the dev overlay reads the model from the node"
    if overlay != "dev":
        assert model["persistentVolumeClaim"] == {"claimName": "loraplex-model", "readOnly": True}
    assert s.disk_cache_dir
    _, cache = mount_for(workload, c, s.disk_cache_dir)
    assert quantity_bytes(cache["emptyDir"]["sizeLimit"]) >= s.disk_cache_bytes
    assert s.tokens_file and not s.insecure
    assert_secret_file(workload, c, s.tokens_file)
    registry_host, registry_port = host_port(s.registry)
    service = named(docs, "Service", registry_host)
    (svc_port,) = [p for p in service["spec"]["ports"] if p["port"] == registry_port]
    _, registry_c, registry_s = the_registry(docs)
    assert port_number(registry_c, svc_port["targetPort"]) == host_port(registry_s.listen)[1]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_device_image_and_accelerator_per_overlay(overlay: str) -> None:
    workload, c, s = the_engine(render(Variant(overlay)))
    resources = c["resources"]
    if overlay == "gpu":
        assert s.device == "cuda"
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec(workload).get("tolerations", []))
    else:
        assert s.device == "cpu"
        assert "nvidia.com/gpu" not in {**resources.get("limits", {}), **resources.get("requests", {})}


# ------------------------------------------------------------------------------------------- wiring
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_ids(VARIANTS))
def test_services_select_pods_and_name_their_ports(variant: Variant) -> None:
    docs = render(variant)
    for service in of_kind(docs, "Service"):
        pods = [w for w in workloads(docs) if selects(service["spec"]["selector"], pod_labels(w))]
        assert pods, f"Service {service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            for w in pods:
                named_ports = {p.get("name"): p["containerPort"] for c in containers(w) for p in c.get("ports", [])}
                target = port["targetPort"]
                assert target in (named_ports if isinstance(target, str) else named_ports.values()), (
                    f"Service {service['metadata']['name']} port {port['name']} → {target}: no such container port"
                )


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_ids(VARIANTS))
def test_disruption_budgets_cover_registry_and_engine(variant: Variant) -> None:
    docs = render(variant)
    covered = set()
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        chosen = [w for w in workloads(docs) if selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(w))]
        assert len(chosen) == 1, f"PDB {pdb['metadata']['name']} must select exactly one workload"
        assert pdb["spec"].get("maxUnavailable") == 1
        covered.add(chosen[0]["metadata"]["name"])
    assert covered >= {"loraplex-registry", "loraplex-engine"}


# ------------------------------------------------------------------------------------------- security
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_ids(VARIANTS))
def test_pods_meet_the_restricted_pod_security_standard(variant: Variant) -> None:
    docs = render(variant)
    images = compose_images()
    for workload in workloads(docs):
        spec, name = pod_spec(workload), workload["metadata"]["name"]
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccomp"
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        if variant.target != "dev":
            assert not [v for v in spec.get("volumes", []) if "hostPath" in v], f"{name}: hostPath"
        for c in containers(workload):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{name}/{c['name']}: allowPrivilegeEscalation"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}/{c['name']}: capabilities"
            assert not sc.get("privileged"), f"{name}/{c['name']}: privileged"
            if image_repo(c) in images:
                assert sc.get("readOnlyRootFilesystem") is True, f"{name}/{c['name']}: writable root"
                uid = dockerfile_uid(images[image_repo(c)])
                assert (pod_sc.get("runAsUser"), pod_sc.get("runAsGroup")) == (uid, uid), f"{name}: image's uid"
                assert spec.get("automountServiceAccountToken") is False, f"{name}: needs no API token"
                assert spec.get("enableServiceLinks") is False, f"{name}: service links pollute LORAPLEX_* env"


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_ids(VARIANTS))
def test_every_container_requests_cpu_and_memory(variant: Variant) -> None:
    for workload in workloads(render(variant)):
        for c in containers(workload):
            requests = c.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(requests), f"{workload['metadata']['name']}/{c['name']}"
            assert "memory" in c["resources"].get("limits", {}), f"{workload['metadata']['name']}/{c['name']}"


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_production_overlays_ship_no_secret_and_enforce_restricted(overlay: str) -> None:
    docs = render(Variant(overlay))
    assert not of_kind(docs, "Secret"), "credentials are created in the cluster, never committed"
    labels = named(docs, "Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# ------------------------------------------------------------------------------------------- dev overlay
def test_dev_registry_uses_the_in_cluster_postgres_and_minio() -> None:
    docs = render(Variant("dev"))
    _, c, s = the_registry(docs)
    postgres = container(named(docs, "StatefulSet", "postgres"), "postgres")
    pg_env = env_values(docs, postgres, FROM_SECRET)
    url = urlsplit(s.db)
    service = named(docs, "Service", url.hostname or "")
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    assert (url.username, url.path.lstrip("/")) == (pg_env["POSTGRES_USER"], pg_env["POSTGRES_DB"])
    assert secret_ref(postgres, "POSTGRES_PASSWORD") == secret_ref(c, "PGPASSWORD"), "one password, one Secret"
    minio = container(named(docs, "StatefulSet", "minio"), "minio")
    assert secret_ref(minio, "MINIO_ROOT_USER") == secret_ref(c, "AWS_ACCESS_KEY_ID")
    assert secret_ref(minio, "MINIO_ROOT_PASSWORD") == secret_ref(c, "AWS_SECRET_ACCESS_KEY")
    endpoint = urlsplit(s.s3_endpoint or "")
    minio_service = named(docs, "Service", endpoint.hostname or "")
    (s3_port,) = [p for p in minio_service["spec"]["ports"] if p["port"] == endpoint.port]
    assert port_number(minio, s3_port["targetPort"]) == 9000
    init = container(named(docs, "Job", "minio-bucket-init"), "mc")
    init_env = env_values(docs, init, FROM_SECRET)
    assert urlsplit(s.blobs).netloc == init_env["BUCKET"], "the bucket the registry writes to is the one created"
    assert init_env["S3_ENDPOINT"] == s.s3_endpoint
    assert 'mb --ignore-existing "local/${BUCKET}"' in " ".join(init["args"])


def test_dev_jobs_register_the_engines_model_with_tokens_that_authenticate() -> None:
    docs = render(Variant("dev"))
    job = named(docs, "Job", "loraplex-register-model")
    register = container(job, "register")
    client = cli_settings(docs, register)
    args = parse_args(register["args"])
    _, engine_c, engine = the_engine(docs)
    assert (args.dir, args.name) == (engine.model, engine.base_model)
    assert client.registry == engine.registry
    assert mount_for(job, register, args.dir)[1]["hostPath"]["path"] == engine.model

    auth = generated(docs, "Secret", "loraplex-auth")["metadata"]["name"]
    registry_tokens = TokenAuthority.from_document(yaml.safe_load(secret_value(docs, auth, "registry-tokens.json")))
    engine_tokens = TokenAuthority.from_document(yaml.safe_load(secret_value(docs, auth, "engine-tokens.json")))
    admin = registry_tokens.authenticate(f"Bearer {client.token}")
    assert admin.can("any-namespace", "admin"), "registering a base model needs the admin scope"
    assert engine_tokens.authenticate(f"Bearer {client.token}").can("any-namespace", "admin")
    assert engine.registry_token and engine.registry_token != FROM_SECRET
    assert registry_tokens.authenticate(f"Bearer {engine.registry_token}").can("any-namespace", "read")
    assert secret_ref(engine_c, "LORAPLEX_REGISTRY_TOKEN")[0] == auth


@pytest.mark.parametrize("variant", ALL_RENDERINGS, ids=variant_ids(ALL_RENDERINGS))
def test_third_party_images_are_pinned_like_compose(variant: Variant) -> None:
    """Every image loraplex does not build is pinned by digest, to the same reference compose.yaml uses."""
    compose = (ROOT / "compose.yaml").read_text()
    for workload in workloads(render(variant)):
        for spec in containers(workload):
            image = str(spec["image"])
            if image.split("/")[-1].startswith("loraplex-"):
                continue
            if "llm-d" in image or "gateway-api-inference-extension" in image:
                assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
                continue
            assert "@sha256:" in image, f"{workload['metadata']['name']}: {image} is not pinned by digest"
            assert image in compose, f"{image} differs from the pin in compose.yaml"
