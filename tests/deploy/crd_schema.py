"""Check a custom resource against its CRD's published OpenAPI v3 schema, offline.

Why not a plain ``jsonschema`` call on the CRD's schema: the API server prunes unknown fields silently, but
``kubectl apply`` (server-side strict field validation, its default) rejects them, so the check closes every
object that lists its properties. CEL rules (``x-kubernetes-validations``) are not JSON Schema: each rule the
vendored CRD carries is evaluated here by a Python predicate, and a rule this module does not know fails the
check, so a newer CRD cannot slip a constraint past the test unnoticed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

Schema = dict[str, Any]


def _port_required_for_services(value: dict[str, Any], schema: Schema) -> bool:
    kind = value.get("kind", schema["properties"]["kind"].get("default"))
    return kind != "Service" or "port" in value


def _unique_port_numbers(value: list[dict[str, Any]], schema: Schema) -> bool:
    numbers = [item.get("number") for item in value]
    return len(numbers) == len(set(numbers))


# CEL rule text → the same condition in Python (value, the schema node carrying the rule).
CEL_RULES: dict[str, Callable[[Any, Schema], bool]] = {
    "self.kind != 'Service' || has(self.port)": _port_required_for_services,
    "self.all(p1, self.exists_one(p2, p1.number==p2.number))": _unique_port_numbers,
}


def load_crd(path: Path) -> dict[str, Any]:
    crd = yaml.safe_load(path.read_text())
    assert crd["kind"] == "CustomResourceDefinition"
    return dict(crd)


def version_schema(crd: dict[str, Any], version: str) -> Schema:
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert served["served"], f"{crd['metadata']['name']} does not serve {version}"
    return dict(served["schema"]["openAPIV3Schema"])


def closed(schema: Schema) -> Schema:
    """The schema as JSON Schema with unknown fields rejected and Kubernetes extensions dropped."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in out:
        out["properties"] = {k: closed(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = closed(out["additionalProperties"])
    if "items" in out:
        out["items"] = closed(out["items"])
    return out


def cel_rules(schema: Schema) -> Iterator[str]:
    for rule in schema.get("x-kubernetes-validations", []):
        yield rule["rule"]
    for child in schema.get("properties", {}).values():
        yield from cel_rules(child)
    if isinstance(schema.get("additionalProperties"), dict):
        yield from cel_rules(schema["additionalProperties"])
    if "items" in schema:
        yield from cel_rules(schema["items"])


def _cel_errors(schema: Schema, value: Any, path: str) -> Iterator[str]:
    for rule in schema.get("x-kubernetes-validations", []):
        check = CEL_RULES.get(rule["rule"])
        if check is None:
            yield f"{path}: CEL rule {rule['rule']!r} is unknown to this test; add its Python form to CEL_RULES"
        elif not check(value, schema):
            yield f"{path}: {rule.get('message', rule['rule'])}"
    if isinstance(value, dict):
        for key, child in schema.get("properties", {}).items():
            if key in value:
                yield from _cel_errors(child, value[key], f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from _cel_errors(schema["items"], item, f"{path}[{i}]")


def errors(schema: Schema, obj: dict[str, Any]) -> list[str]:
    """Every way ``obj`` breaks ``schema`` (empty when it conforms)."""
    validator = jsonschema.Draft7Validator(closed(schema))
    found = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(obj)]
    return found + list(_cel_errors(schema, obj, "<root>"))
