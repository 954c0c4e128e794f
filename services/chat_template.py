"""A model's own chat template, rendered exactly as transformers' ``apply_chat_template`` renders it.

Why not call transformers: the engine does not depend on it (it is a dev/test tool), and a chat template is
untrusted code from a model repository, so it runs in Jinja's ``ImmutableSandboxedEnvironment`` with the same
globals, filters and extensions transformers provides (``raise_exception``, ``strftime_now``, ``tojson`` without
HTML escaping, a restricted ``dict`` and ``namespace``, loop controls, the ``{% generation %}`` block) and the
same inputs (messages without ``None`` values, reasoning aliases, the tokenizer's special tokens as strings,
``tools``/``documents`` None, ``add_generation_prompt``). tests/services/test_chat_template.py compares the
output with transformers on real-world templates.

Where templates live (transformers' precedence): ``chat_template.jinja`` plus ``additional_chat_templates/*.jinja``
if any file exists, else ``chat_template`` in ``tokenizer_config.json`` (a string, or a list of named templates).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from loraplex.registry.errors import InvalidArgument

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# The named special tokens transformers passes to every template (``special_tokens_map``).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning arrives under; templates read the first (transformers aliases them the same way).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Template variables a caller may not override through ``chat_template_kwargs``.
RESERVED_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}`` marks assistant text for training masks; rendering keeps it as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


class _TemplateDict:
    """``dict(...)`` for templates without exposing the ``dict`` type itself (as transformers does)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` refusing underscore names, so a template cannot reach interpreter internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes ({name!r})"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def sandbox() -> ImmutableSandboxedEnvironment:
    """A fresh sandboxed environment configured like transformers' chat-template environment."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled template and the special-token strings it sees."""

    source: str
    special_tokens: Mapping[str, str]
    compiled: jinja2.Template

    @classmethod
    def from_source(cls, source: str, special_tokens: Mapping[str, str]) -> ChatTemplate:
        try:
            compiled = sandbox().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise InvalidArgument(f"the model's chat template does not compile: {exc}") from exc
        return cls(source, dict(special_tokens), compiled)

    def render(self, messages: Sequence[Mapping[str, Any]], variables: Mapping[str, Any] | None = None) -> str:
        """The prompt text for ``messages`` followed by the assistant's generation prompt.

        ``variables`` are extra template variables (e.g. ``enable_thinking``); they override special tokens, as
        keyword arguments to ``apply_chat_template`` do. Template failures are the caller's bad input (a template
        raising on roles that do not alternate, say): ``InvalidArgument`` with the template's own message.
        """
        extra = dict(variables or {})
        reserved = RESERVED_VARIABLES & extra.keys()
        if reserved:
            raise InvalidArgument(
                f"chat_template_kwargs may not set {sorted(reserved)}", metadata={"field": "chat_template_kwargs"}
            )
        context = {**self.special_tokens, **extra}
        try:
            return self.compiled.render(
                messages=normalize_messages(messages),
                tools=None,
                documents=None,
                add_generation_prompt=True,
                **context,
            )
        except jinja2.TemplateError as exc:
            raise InvalidArgument(
                f"the chat template rejected these messages: {exc}", metadata={"field": "messages"}
            ) from exc
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise InvalidArgument(
                f"the chat template failed on these messages: {exc}", metadata={"field": "messages"}
            ) from exc


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Fresh message dicts as transformers hands them to templates: no ``None`` values, reasoning aliased."""
    out = []
    for message in messages:
        plain = {key: value for key, value in message.items() if value is not None}
        reasoning = next((plain[key] for key in REASONING_FIELDS if plain.get(key) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        out.append(plain)
    return out


def load_chat_template(model_dir: Path) -> ChatTemplate | None:
    """The model's default chat template, or None when it has none (blocking file reads: call off the loop)."""
    config = _read_json(model_dir / TOKENIZER_CONFIG)
    templates = _template_files(model_dir) or _config_templates(config)
    if not templates:
        return None
    if "default" not in templates:
        raise InvalidArgument(
            f"the model has chat templates {sorted(templates)} but none named 'default'", reason="NO_CHAT_TEMPLATE"
        )
    return ChatTemplate.from_source(templates["default"], special_tokens(model_dir, config))


def _template_files(model_dir: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    single = model_dir / TEMPLATE_FILE
    if single.is_file():
        found["default"] = single.read_text(encoding="utf-8")
    extra = model_dir / TEMPLATE_DIR
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            found[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    return found


def _config_templates(config: Mapping[str, Any]) -> dict[str, str]:
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {str(t["name"]): str(t["template"]) for t in value if isinstance(t, dict) and "name" in t}
    return {}


def special_tokens(model_dir: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """The tokenizer's named special tokens as strings: transformers' ``special_tokens_map`` for this folder.

    Named tokens, plus model-specific ones (any other ``*_token`` key, and a dict ``extra_special_tokens`` or
    ``model_specific_special_tokens``); without ``added_tokens_decoder`` the legacy ``special_tokens_map.json``
    overrides the config, as in transformers.
    """
    values: dict[str, Any] = dict(config)
    if "added_tokens_decoder" not in config:
        values.update(_read_json(model_dir / SPECIAL_TOKENS_MAP))
    out: dict[str, str] = {}
    for key, value in values.items():
        if key in SPECIAL_TOKEN_NAMES or key.endswith("_token"):
            text = _token_text(value)
            if text is not None:
                out[key] = text
    for key in ("extra_special_tokens", "model_specific_special_tokens"):
        named = values.get(key)
        if isinstance(named, dict):
            out.update({k: t for k, v in named.items() if (t := _token_text(v)) is not None})
    return out


def _token_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InvalidArgument(f"{path.name} is not valid JSON: {exc}") from exc
    return doc if isinstance(doc, dict) else {}
