"""Chat templates render exactly as transformers' ``apply_chat_template(..., add_generation_prompt=True)``.

The templates below are written in the style of widely used model families (Llama 3 headers, ChatML as in
Qwen2 with a tools branch and ``tojson``, Mistral's [INST] with ``raise_exception`` on bad role order) and use
the features transformers gives templates: special tokens, ``namespace``, loop controls, ``strftime_now``,
``{% generation %}``, model-specific ``*_token`` entries. Each is saved with a real tokenizer folder and rendered
by transformers and by loraplex.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from loraplex.registry.errors import InvalidArgument
from loraplex.services.chat_template import load_chat_template
from tests.fixtures.hf import build_tokenizer

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CHATML_WITH_TOOLS = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}You are helpful.{%- endif %}
    {{- '\\n\\n# Tools\\n<tools>' }}
    {%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
    {{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0]['role'] != 'system' %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first and tools %}{% continue %}{% endif %}
    {%- if message.content is string %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- for part in message.content %}{{- part.text }}{%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# namespace(), {% break %}, strftime_now, {% generation %}, reasoning aliases, a model-specific token, tojson kwargs.
FEATURES = """{%- set ns = namespace(system='', turns=0) -%}
{%- for m in messages -%}
{%- if m.role == 'system' -%}{%- set ns.system = m.content -%}{%- break -%}{%- endif -%}
{%- endfor -%}
[{{ strftime_now('%Y') }}] {{ ns.system }}
{% for m in messages if m.role != 'system' -%}
{%- set ns.turns = ns.turns + 1 -%}
{%- if m.role == 'assistant' -%}
{%- if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}|{{ m.thinking }}</think>{% endif -%}
{% generation %}{{ m.content }}{% endgeneration %}{{ eot_token }}
{%- else -%}
{{ m.role }}: {{ m.content }}{% if m.name is defined %} ({{ m.name }}){% endif %}{{ eot_token }}
{%- endif %}
{% endfor -%}
{{ {'turns': ns.turns, 'note': 'é<&>'} | tojson(sort_keys=True) }}
{%- if add_generation_prompt %}assistant:{% endif %}"""

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "  Be brief.  "},
    {"role": "user", "content": "hello <there> & welcome", "name": None},
    {"role": "assistant", "content": "hi!", "reasoning": "say hi"},
    {"role": "user", "content": "what is lora?", "name": "bob"},
]


def tokenizer_dir(root: Path, template: str | None, *, as_file: bool = False, **config: Any) -> Path:
    """A real tokenizer folder whose chat template sits in tokenizer_config.json (or chat_template.jinja)."""
    folder = root / f"tok-{uuid.uuid4().hex[:8]}"
    build_tokenizer(folder)
    path = folder / "tokenizer_config.json"
    doc = json.loads(path.read_text())
    doc.pop("chat_template", None)
    doc.update(config)
    if as_file and template is not None:
        (folder / "chat_template.jinja").write_text(template)
    elif template is not None:
        doc["chat_template"] = template
    path.write_text(json.dumps(doc))
    return folder


def transformers_render(folder: Path, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    return str(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs))


def ours(folder: Path, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    template = load_chat_template(folder)
    assert template is not None
    return template.render(messages, kwargs)


@pytest.mark.parametrize(
    ("template", "messages"),
    [
        (LLAMA3, CONVERSATION),
        (CHATML_WITH_TOOLS, CONVERSATION),
        (
            CHATML_WITH_TOOLS,
            [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        ),
        (MISTRAL, [m for m in CONVERSATION if m["role"] != "system"]),
        (FEATURES, CONVERSATION),
    ],
    ids=["llama3", "chatml", "chatml-parts", "mistral", "features"],
)
def test_rendering_equals_transformers(tmp_path: Path, template: str, messages: list[dict[str, Any]]) -> None:
    folder = tokenizer_dir(tmp_path, template, eot_token="</s>")
    want = transformers_render(folder, messages)
    assert want  # the template produced something
    assert ours(folder, messages) == want


def test_template_file_wins_over_the_config_and_kwargs_reach_the_template(tmp_path: Path) -> None:
    template = "{{ bos_token }}{% if enable_thinking %}think {% endif %}{{ messages[-1].content }}"
    folder = tokenizer_dir(tmp_path, template, as_file=True)
    doc = json.loads((folder / "tokenizer_config.json").read_text())
    doc["chat_template"] = "the config's template loses"
    (folder / "tokenizer_config.json").write_text(json.dumps(doc))
    messages = [{"role": "user", "content": "hey"}]
    assert ours(folder, messages) == transformers_render(folder, messages) == "<s>hey"
    assert ours(folder, messages, enable_thinking=True) == transformers_render(folder, messages, enable_thinking=True)


def test_named_templates_use_the_default(tmp_path: Path) -> None:
    named = [{"name": "default", "template": "D{{ messages[0].content }}"}, {"name": "rag", "template": "R"}]
    folder = tokenizer_dir(tmp_path, None, chat_template=named)
    messages = [{"role": "user", "content": "x"}]
    assert ours(folder, messages) == transformers_render(folder, messages) == "Dx"


def test_a_model_without_a_template_has_none(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    build_tokenizer(folder)
    assert load_chat_template(folder) is None


def test_template_errors_are_invalid_arguments(tmp_path: Path) -> None:
    folder = tokenizer_dir(tmp_path, MISTRAL)
    with pytest.raises(InvalidArgument, match="roles must alternate"):
        ours(folder, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(InvalidArgument, match="may not set"):
        template = load_chat_template(folder)
        assert template is not None
        template.render([{"role": "user", "content": "a"}], {"messages": []})


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages.append({'role': 'x'}) }}",  # the sandbox is immutable
        "{% set ns = namespace(_secret=1) %}",  # no underscore attributes on namespaces
        "{{ raise_exception.__globals__ }}",  # no reaching into Python internals
        "{{ ().__class__.__base__.__subclasses__() }}",
    ],
)
def test_templates_cannot_escape_the_sandbox(tmp_path: Path, template: str) -> None:
    folder = tokenizer_dir(tmp_path, template)
    loaded = load_chat_template(folder)
    assert loaded is not None
    try:
        rendered = loaded.render([{"role": "user", "content": "a"}])
    except InvalidArgument:
        return
    assert "function" not in rendered and "class" not in rendered, rendered
