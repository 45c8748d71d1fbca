"""Chat templates: the model's HF jinja `chat_template`, or an MLC `conv_template`.

`load_chat_template(model_dir, tokenizer)` picks, in order:

    1. tokenizer_config.json `chat_template` (a string, or a list of named templates: "tool_use"
       when tools are given, else "default"), or chat_template.jinja / chat_template.json;
    2. mlc-chat-config.json `conv_template` (a preset name or MLC's full JSON object);
    3. the chatml preset.

Both kinds take OpenAI-style messages; a content that is a list of {"type": "text"} parts is
joined first, and tool-call `arguments` given as JSON strings are parsed (HF templates expect a
mapping, as in transformers/vLLM). A rendered prompt carries its own BOS text where the model
wants one, so encode it with add_special_tokens=False (HFTokenizer drops a doubled BOS anyway).
A template that rejects the messages (`raise_exception`) becomes an InvalidRequestError.
`template_kwargs` (a request's chat_template_kwargs, e.g. `enable_thinking`) are extra template
variables; they may override the special-token strings but not messages, tools or
add_generation_prompt (protocol/chat.py refuses those keys).

A template that ignores `tools` or `tool_calls`, or fails on a None content, gets llama.cpp's
polyfills (runtime/tool_prompt.py): the template is probed once per named template, and the
tools, calls and results it cannot render are written into the messages in the model's
tool-call format (`call_format`, found in the template source).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import attrs
import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlctrio.engine.tokens import ChatTemplate, Tokenizer
from mlctrio.errors import InvalidRequestError, ModelLoadError
from mlctrio.protocol.tool_calls import ToolCallFormat
from mlctrio.runtime.conv_template import (
    CONV_PRESETS,
    ConvTemplate,
    _plain,
    conv_template_from_config,
    normalize_messages,
)
from mlctrio.runtime.tokenizer import read_optional_json
from mlctrio.runtime.tool_prompt import (
    TemplateCaps,
    detect_call_format,
    needs_caps,
    non_null_content,
    polyfill,
    probe_caps,
)

__all__ = [
    "CONV_PRESETS",
    "ConvTemplate",
    "HFChatTemplate",
    "conv_template_from_config",
    "load_chat_template",
    "normalize_messages",
]


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # HF's override: jinja's own tojson escapes HTML characters, which no model was trained on.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


@attrs.define(eq=False)
class HFChatTemplate:
    """An HF jinja chat template, rendered in a sandbox the way transformers renders it."""

    templates: Mapping[str, str]  # name -> jinja source; "default" always present
    special_tokens: Mapping[str, str] = attrs.field(factory=dict)  # bos_token, eos_token, ...
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    _compiled: dict[str, jinja2.Template] = attrs.field(init=False, factory=dict)
    _caps: dict[str, TemplateCaps] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        if "default" not in self.templates:
            raise ModelLoadError(f"chat templates {sorted(self.templates)} have no 'default'")
        for name, source in self.templates.items():
            try:
                self._compiled[name] = _compile(source)
            except jinja2.TemplateError as exc:
                raise ModelLoadError(f"chat template {name!r} does not compile: {exc}") from exc

    @property
    def source(self) -> str:
        """The jinja source of every named template (`--reasoning-parser auto` looks for
        `<think>` in it: server/reasoning.py)."""
        return "\n".join(self.templates.values())

    @property
    def call_format(self) -> ToolCallFormat:
        """The model's tool-call format, as its template source shows it (hermes if unknown)."""
        return detect_call_format(" ".join(self.templates.values()))

    def caps(self, name: str = "default") -> TemplateCaps:
        """What the named template renders (probed on first use, then cached)."""
        caps = self._caps.get(name)
        if caps is None:
            caps = self._caps[name] = probe_caps(
                lambda messages, tools: self._render(name, messages, tools, True)
            )
        return caps

    def _render(
        self,
        name: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        add_generation_prompt: bool,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        return self._compiled[name].render(
            **{**self.special_tokens, **(template_kwargs or {})},
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
        )

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        name = "tool_use" if tools and "tool_use" in self._compiled else "default"
        try:
            msgs = non_null_content(normalize_messages(messages))
            plain_tools = _plain(list(tools)) if tools else None
            if needs_caps(msgs, plain_tools):
                msgs, plain_tools = polyfill(msgs, plain_tools, self.caps(name), self.call_format)
            return self._render(name, msgs, plain_tools, add_generation_prompt, template_kwargs)
        except InvalidRequestError:
            raise
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"chat template: {exc}", param="messages") from exc
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise InvalidRequestError(
                f"chat template cannot render these messages: {exc}", param="messages"
            ) from exc


def _hf_templates(model_dir: Path, tok_config: Mapping[str, Any]) -> dict[str, str] | None:
    raw: Any = tok_config.get("chat_template")
    if raw is None and (model_dir / "chat_template.jinja").is_file():
        raw = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if raw is None:
        raw = read_optional_json(model_dir / "chat_template.json").get("chat_template")
    if isinstance(raw, str):
        return {"default": raw}
    if isinstance(raw, list):
        named = {
            str(t["name"]): str(t["template"])
            for t in raw
            if isinstance(t, Mapping) and "name" in t and "template" in t
        }
        if named and "default" not in named:
            named["default"] = next(iter(named.values()))
        return named or None
    return None


def _special_token_strings(tok_config: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = tok_config.get(key)
        if isinstance(value, Mapping):
            value = value.get("content")
        out[key] = value if isinstance(value, str) else ""
    return out


def load_chat_template(model_dir: str | Path, tokenizer: Tokenizer) -> ChatTemplate:
    """The model's chat template: HF jinja first, then MLC conv_template, else chatml."""
    model_dir = Path(model_dir)
    tok_config = read_optional_json(model_dir / "tokenizer_config.json")
    templates = _hf_templates(model_dir, tok_config)
    if templates:
        return HFChatTemplate(
            templates,
            special_tokens=_special_token_strings(tok_config),
            stop_token_ids=tuple(tokenizer.eos_token_ids),
        )
    conv = read_optional_json(model_dir / "mlc-chat-config.json").get("conv_template")
    return conv_template_from_config(conv if conv is not None else "chatml", tokenizer)
