"""Rendering deploy/k8s with ``kubectl kustomize`` and walking the result.

Why render instead of reading the YAML files: what reaches a cluster is kustomize's output (patches merged,
images and namespaces set, generated Secret/ConfigMap names with their hash suffixes substituted into every
reference), so every check runs on that output. A variant with the inference-gateway component is rendered
the way docs/kubernetes.md tells users to add it: a kustomization listing the overlay and the component.
"""

from __future__ import annotations

import base64
import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
COMPONENT = K8S / "components" / "inference-gateway"
OVERLAYS = ("cpu", "gpu", "dev")
NAMESPACE = "loraplex"
# Kinds whose spec.template is a pod template.
WORKLOADS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"}

Manifest = dict[str, Any]


def kubectl() -> str | None:
    return shutil.which("kubectl")


@dataclass(frozen=True)
class Variant:
    """One rendering target: ``base`` or an overlay, with or without the inference-gateway component."""

    target: str
    gateway: bool = False

    @property
    def id(self) -> str:
        return self.target + ("+inference-gateway" if self.gateway else "")


VARIANTS = [Variant(t, gw) for t in OVERLAYS for gw in (False, True)]


def run_kustomize(path: Path) -> str:
    binary = kubectl()
    assert binary is not None, "kubectl is not on PATH"
    result = subprocess.run([binary, "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return result.stdout


def kustomization_with_component(overlay: Path, into: Path) -> Path:
    """A kustomization in ``into`` listing ``overlay`` plus the component (kustomize wants relative paths)."""
    doc = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": NAMESPACE,
        "resources": [os.path.relpath(overlay, into)],
        "components": [os.path.relpath(COMPONENT, into)],
    }
    (into / "kustomization.yaml").write_text(yaml.safe_dump(doc))
    return into


@functools.cache
def _render_text(variant: Variant) -> str:
    directory = K8S / "base" if variant.target == "base" else K8S / "overlays" / variant.target
    if not variant.gateway:
        return run_kustomize(directory)
    with tempfile.TemporaryDirectory() as tmp:
        return run_kustomize(kustomization_with_component(directory, Path(tmp)))


def render(variant: Variant) -> list[Manifest]:
    """The variant's manifests (a fresh copy each call, so a test may modify what it gets)."""
    docs = [doc for doc in yaml.safe_load_all(_render_text(variant)) if doc]
    assert all(isinstance(doc, dict) for doc in docs)
    return docs


def of_kind(docs: list[Manifest], kind: str) -> list[Manifest]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[Manifest], kind: str, name: str) -> Manifest:
    found = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def generated(docs: list[Manifest], kind: str, name: str) -> Manifest:
    """A generator's output: ``name`` plus kustomize's hash suffix."""
    found = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"].rsplit("-", 1)[0] == name]
    assert len(found) == 1, f"expected one generated {kind} {name}-<hash>, found {len(found)}"
    return found[0]


def workloads(docs: list[Manifest]) -> Iterator[Manifest]:
    return (doc for doc in docs if doc["kind"] in WORKLOADS)


def pod_spec(workload: Manifest) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Manifest) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def containers(workload: Manifest) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(workload: Manifest, name: str) -> dict[str, Any]:
    (found,) = [c for c in containers(workload) if c["name"] == name]
    return found


def port_number(c: dict[str, Any], name: str) -> int:
    (number,) = [int(p["containerPort"]) for p in c.get("ports", []) if p.get("name") == name]
    return number


def volume(workload: Manifest, name: str) -> dict[str, Any]:
    (found,) = [v for v in pod_spec(workload).get("volumes", []) if v["name"] == name]
    return dict(found)


def mount_for(workload: Manifest, c: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volumeMount, volume) of the deepest mount holding ``path`` in container ``c``."""
    mounts = [m for m in c.get("volumeMounts", []) if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
    assert mounts, f"{c['name']}: nothing is mounted at or above {path}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    return mount, volume(workload, mount["name"])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def secret_value(docs: list[Manifest], name: str, key: str) -> str | None:
    """A Secret's decoded value when the rendering holds that Secret (only the dev overlay ships any)."""
    for secret in of_kind(docs, "Secret"):
        if secret["metadata"]["name"] == name:
            if key in secret.get("stringData", {}):
                return str(secret["stringData"][key])
            raw = secret.get("data", {}).get(key)
            return None if raw is None else base64.b64decode(raw).decode()
    return None


def env_values(docs: list[Manifest], c: dict[str, Any], placeholder: str) -> dict[str, str]:
    """The container's environment: literal values, Secret values the rendering holds, else ``placeholder``."""
    assert not c.get("envFrom"), f"{c['name']}: envFrom hides variable names from review; list each one"
    values: dict[str, str] = {}
    for item in c.get("env", []):
        if "value" in item:
            values[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"].get("secretKeyRef")
        if ref is None:
            values[item["name"]] = placeholder
            continue
        value = secret_value(docs, ref["name"], ref["key"])
        values[item["name"]] = placeholder if value is None else value
    return values


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)
