"""Name and reference rules: the accepted forms parse exactly, everything else is an InvalidArgument."""

from __future__ import annotations

import pytest

from loraplex.registry.errors import InvalidArgument
from loraplex.registry.refs import (
    AdapterRef,
    parse_ref,
    validate_adapter_name,
    validate_alias,
    validate_base_model_name,
    validate_labels,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("acme/support", AdapterRef("acme/support", "acme", "latest", "")),
        ("acme/support@latest", AdapterRef("acme/support", "acme", "latest", "")),
        ("acme/support@3", AdapterRef("acme/support", "acme", "version", "3")),
        ("acme/support@prod", AdapterRef("acme/support", "acme", "alias", "prod")),
        ("a/b@canary-2.x_y", AdapterRef("a/b", "a", "alias", "canary-2.x_y")),
        (f"acme/support@{DIGEST}", AdapterRef("acme/support", "acme", "digest", DIGEST)),
        ("0ns/9.name_x-y", AdapterRef("0ns/9.name_x-y", "0ns", "latest", "")),
    ],
)
def test_valid_refs_parse(ref: str, expected: AdapterRef) -> None:
    parsed = parse_ref(ref)
    assert parsed == expected
    assert str(parsed) == (ref.removesuffix("@latest"))


def test_version_selector_exposes_int() -> None:
    assert parse_ref("a/b@42").version == 42
    with pytest.raises(InvalidArgument):
        _ = parse_ref("a/b@prod").version


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "acme",
        "/support",
        "acme/",
        "acme/support/extra",
        "Acme/support",
        "acme/Support",
        "acme/../etc",
        "../acme/x",
        "acme/a..b",
        ".acme/x",
        "acme/.x",
        "-acme/x",
        "acme/x y",
        "acme/x\n",
        "a" * 64 + "/x",
        "acme/" + "x" * 64,
        "acme/x@",
        "acme/x@0",
        "acme/x@007",
        "acme/x@-1",
        "acme/x@99999999999",
        "acme/x@Prod",
        "acme/x@1abc",
        "acme/x@_x",
        "acme/x@sha256:abc",
        "acme/x@sha256:" + "AB" * 32,
        "acme/x@sha256:" + "ab" * 33,
        "acme/x@md5:" + "ab" * 16,
        "acme/x@a@b",
        "acme/x@a..b",
    ],
)
def test_invalid_refs_rejected(ref: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_ref(ref)
    assert info.value.reason in ("INVALID_REF", "INVALID_NAME")


def test_name_length_limits_are_exact() -> None:
    assert validate_adapter_name("a" * 63 + "/" + "b" * 63)
    with pytest.raises(InvalidArgument):
        validate_adapter_name("a" * 64 + "/b")
    assert validate_base_model_name("m" * 128)
    with pytest.raises(InvalidArgument):
        validate_base_model_name("m" * 129)


@pytest.mark.parametrize("name", ["Llama", "a/b", "../x", "a..b", "", "-x", "x y", "é"])
def test_invalid_base_model_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_base_model_name(name)


def test_alias_rules() -> None:
    assert validate_alias("prod") == "prod"
    assert validate_alias("canary.v2-x_y") == "canary.v2-x_y"
    for bad in ("", "1prod", "Prod", "-x", "a" * 64, "a/b", "a..b"):
        with pytest.raises(InvalidArgument):
            validate_alias(bad)
    with pytest.raises(InvalidArgument) as info:
        validate_alias("latest")
    assert info.value.reason == "RESERVED_ALIAS"


def test_label_rules() -> None:
    assert validate_labels({"team": "nlp", "tier.x-y_z": ""}) == {"team": "nlp", "tier.x-y_z": ""}
    for bad in ({"Team": "x"}, {"1x": "y"}, {"k": "v" * 64}, {"k": "line\nbreak"}, {"": "x"}):
        with pytest.raises(InvalidArgument) as info:
            validate_labels(bad)
        assert info.value.reason == "INVALID_LABEL"
