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
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import attrs
import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlctrio.engine.tokens import ChatTemplate, Tokenizer
from mlctrio.errors import InvalidRequestError, ModelLoadError
from mlctrio.runtime.tokenizer import read_optional_json

__all__ = [
    "CONV_PRESETS",
    "ConvTemplate",
    "HFChatTemplate",
    "conv_template_from_config",
    "load_chat_template",
    "normalize_messages",
]


def _content_text(content: Any) -> Any:
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise InvalidRequestError(
                    f"unsupported message content part {kind!r}: only text parts are supported",
                    param="messages",
                )
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    return content


def _plain(value: Any) -> Any:
    """Deep copy into plain dicts/lists, so templates see ordinary mappings."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain-dict messages with text-part lists joined and tool-call arguments parsed."""
    out: list[dict[str, Any]] = []
    for message in messages:
        msg = _plain(message)
        if "content" in msg:
            msg["content"] = _content_text(msg["content"])
        for call in msg.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except ValueError:
                    pass  # leave malformed arguments as the text the client sent
        out.append(msg)
    return out


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

    def __attrs_post_init__(self) -> None:
        if "default" not in self.templates:
            raise ModelLoadError(f"chat templates {sorted(self.templates)} have no 'default'")
        for name, source in self.templates.items():
            try:
                self._compiled[name] = _compile(source)
            except jinja2.TemplateError as exc:
                raise ModelLoadError(f"chat template {name!r} does not compile: {exc}") from exc

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        name = "tool_use" if tools and "tool_use" in self._compiled else "default"
        try:
            return self._compiled[name].render(
                messages=normalize_messages(messages),
                tools=_plain(list(tools)) if tools else None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except InvalidRequestError:
            raise
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"chat template: {exc}", param="messages") from exc
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise InvalidRequestError(
                f"chat template cannot render these messages: {exc}", param="messages"
            ) from exc


_SYSTEM = "{system_message}"
_FUNCTIONS = "{function_string}"
_ROLE_PLACEHOLDERS: Mapping[str, str] = {
    "user": "{user_message}",
    "assistant": "{assistant_message}",
    "tool": "{tool_message}",
}
_SYSTEM_ROLES = ("system", "developer")

# MLC's presets (python/mlc_llm/conversation_template/), as MLC's JSON. Stop token ids are not
# written here: they are looked up in the model's tokenizer (see `stop_tokens`), and "bos": true
# stands for MLC's system_prefix_token_ids=[bos]. Differences from MLC, on purpose: a "tool" role
# everywhere, "</s>" after Mistral's assistant turns and a blank line after its system prompt,
# as Mistral's own template has them.
CONV_PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "chatml": {
            "system_template": f"<|im_start|>system\n{_SYSTEM}<|im_end|>\n",
            "system_message": "A conversation between a user and an LLM-based AI assistant. "
            "The assistant gives helpful and honest answers.",
            "roles": {
                "user": "<|im_start|>user",
                "assistant": "<|im_start|>assistant",
                "tool": "<|im_start|>tool",
            },
            "seps": ["<|im_end|>\n"],
            "role_content_sep": "\n",
            "role_empty_sep": "\n",
            "stop_str": ["<|im_end|>"],
            "stop_tokens": ["<|im_end|>"],
        },
        "qwen2": {
            "system_template": f"<|im_start|>system\n{_SYSTEM}<|im_end|>\n",
            "system_message": "You are a helpful assistant.",
            "roles": {
                "user": "<|im_start|>user",
                "assistant": "<|im_start|>assistant",
                "tool": "<|im_start|>user",
            },
            "role_templates": {"tool": "<tool_response>\n{tool_message}\n</tool_response>"},
            "tool_call_template": "<tool_call>\n{tool_call}\n</tool_call>",
            "seps": ["<|im_end|>\n"],
            "role_content_sep": "\n",
            "role_empty_sep": "\n",
            "stop_str": ["<|endoftext|>", "<|im_end|>"],
            "stop_tokens": ["<|endoftext|>", "<|im_end|>"],
        },
        "llama-3": {
            "system_template": f"<|start_header_id|>system<|end_header_id|>\n\n{_SYSTEM}<|eot_id|>",
            "system_message": "You are a helpful, respectful and honest assistant.",
            "roles": {
                "user": "<|start_header_id|>user",
                "assistant": "<|start_header_id|>assistant",
                "tool": "<|start_header_id|>ipython",
            },
            "seps": ["<|eot_id|>"],
            "role_content_sep": "<|end_header_id|>\n\n",
            "role_empty_sep": "<|end_header_id|>\n\n",
            "stop_str": ["<|end_of_text|>", "<|eot_id|>"],
            "stop_tokens": ["<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"],
            "bos": True,
        },
        "mistral_default": {
            "system_template": f"[INST] {_SYSTEM}\n\n",
            "system_message": "",
            "roles": {"user": "[INST]", "assistant": "[/INST]", "tool": "[INST]"},
            "seps": [" ", "</s>"],
            "role_content_sep": " ",
            "role_empty_sep": "",
            "stop_str": ["</s>"],
            "stop_tokens": ["</s>"],
            "add_role_after_system_message": False,
            "render_empty_system": False,
            "bos": True,
        },
    }
)
_ALIASES: Mapping[str, str] = {
    "llama-3_1": "llama-3",
    "mistral": "mistral_default",
    "chatml_nosystem": "chatml",
}


@attrs.frozen
class ConvTemplate:
    """An MLC conversation template (MLC's `Conversation.as_prompt`, plus tools and tool calls).

    The prompt is: prefix (BOS text), system, then per message
    `role + role_content_sep + role_template(content) + sep`, then `role + role_empty_sep` for
    the generation prompt. `{function_string}` in a template is replaced by the tools' JSON; with
    no such placeholder, tools are listed at the end of the system message.
    """

    name: str
    roles: Mapping[str, str]
    seps: Sequence[str]
    system_template: str = _SYSTEM
    system_message: str = ""
    role_templates: Mapping[str, str] = attrs.field(factory=dict)
    role_content_sep: str = ""
    role_empty_sep: str = ""
    add_role_after_system_message: bool = True
    render_empty_system: bool = True  # False: no system block at all without a system message
    tool_call_template: str = "{tool_call}"
    prefix: str = ""
    stop_strings: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()

    def _system(self, messages: list[dict[str, Any]], tools: Any) -> str:
        texts = [str(m.get("content") or "") for m in messages if m.get("role") in _SYSTEM_ROLES]
        system = "\n\n".join(texts) if texts else self.system_message
        uses_placeholder = any(
            _FUNCTIONS in t for t in (self.system_template, *self.role_templates.values())
        )
        if tools and not uses_placeholder:
            listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
            intro = 'You may call these tools; answer with {"name": ..., "arguments": ...}:'
            system = (f"{system}\n\n" if system else "") + f"{intro}\n{listed}"
        if not system and not self.render_empty_system:
            return ""
        return self.system_template.replace(_SYSTEM, system)

    def _content(self, msg: dict[str, Any]) -> str:
        text = msg.get("content")
        text = "" if text is None else str(text)
        calls = []
        for call in msg.get("tool_calls") or []:
            fn = call.get("function", call) if isinstance(call, dict) else {}
            payload = {"name": fn.get("name"), "arguments": fn.get("arguments", {})}
            calls.append(
                self.tool_call_template.replace(
                    "{tool_call}", json.dumps(payload, ensure_ascii=False)
                )
            )
        return "\n".join(([text] if text else []) + calls)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        msgs = normalize_messages(messages)
        system = self._system(msgs, _plain(list(tools)) if tools else None)
        sep_user, sep_assistant = self.seps[0], self.seps[-1]
        parts = [self.prefix, system]
        turns = [m for m in msgs if m.get("role") not in _SYSTEM_ROLES]
        for i, msg in enumerate(turns):
            role = msg.get("role")
            if role not in self.roles:
                raise InvalidRequestError(
                    f"role {role!r} is not supported by chat template {self.name!r}",
                    param="messages",
                )
            placeholder = _ROLE_PLACEHOLDERS.get(str(role), "{message}")
            body = self.role_templates.get(str(role), placeholder).replace(
                placeholder, self._content(msg)
            )
            bare = not self.add_role_after_system_message and system != "" and i == 0
            head = "" if bare else self.roles[str(role)] + self.role_content_sep
            parts.append(head + body + (sep_assistant if role == "assistant" else sep_user))
        if add_generation_prompt:
            parts.append(self.roles["assistant"] + self.role_empty_sep)
        prompt = "".join(parts)
        if _FUNCTIONS in prompt:
            tools_json = json.dumps(_plain(list(tools)), ensure_ascii=False) if tools else ""
            head, _, tail = prompt.rpartition(_FUNCTIONS)
            prompt = head.replace(_FUNCTIONS, "") + tools_json + tail
        return prompt


def _single_token(tokenizer: Tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def conv_template_from_config(conv: str | Mapping[str, Any], tokenizer: Tokenizer) -> ConvTemplate:
    """A ConvTemplate from mlc-chat-config.json's `conv_template`: a preset name or MLC's JSON.

    Stop token ids: MLC's `stop_token_ids` if given, else the preset's stop tokens looked up in
    the tokenizer; always with the tokenizer's eos ids. BOS: MLC's `system_prefix_token_ids`
    (or a preset's "bos") decoded to text, so the prompt carries it exactly once.
    """
    if isinstance(conv, str):
        preset = CONV_PRESETS.get(_ALIASES.get(conv, conv))
        if preset is None:
            raise ModelLoadError(
                f"unknown conv_template {conv!r}; known: {sorted([*CONV_PRESETS, *_ALIASES])}"
            )
        spec: Mapping[str, Any] = {"name": conv, **preset}
    elif isinstance(conv, Mapping):
        spec = conv
    else:
        raise ModelLoadError(f"conv_template must be a name or an object, not {conv!r}")
    try:
        stop_ids = [int(i) for i in spec.get("stop_token_ids") or []]
        for token in spec.get("stop_tokens") or []:
            found = _single_token(tokenizer, token)
            if found is not None:
                stop_ids.append(found)
        stop_ids += [i for i in tokenizer.eos_token_ids if i not in stop_ids]
        prefix_ids = [int(i) for i in spec.get("system_prefix_token_ids") or []]
        if spec.get("bos") and tokenizer.bos_token_id is not None:
            prefix_ids = [tokenizer.bos_token_id]
        prefix = tokenizer.decode(prefix_ids, skip_special_tokens=False) if prefix_ids else ""
        return ConvTemplate(
            name=str(spec.get("name") or "custom"),
            roles=dict(spec["roles"]),
            seps=tuple(spec["seps"]),
            system_template=str(spec.get("system_template", _SYSTEM)),
            system_message=str(spec.get("system_message", "")),
            role_templates=dict(spec.get("role_templates") or {}),
            role_content_sep=str(spec.get("role_content_sep", "")),
            role_empty_sep=str(spec.get("role_empty_sep", "")),
            add_role_after_system_message=bool(spec.get("add_role_after_system_message", True)),
            render_empty_system=bool(spec.get("render_empty_system", True)),
            tool_call_template=str(spec.get("tool_call_template", "{tool_call}")),
            prefix=prefix,
            stop_strings=tuple(spec.get("stop_str") or ()),
            stop_token_ids=tuple(dict.fromkeys(stop_ids)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"invalid conv_template: {exc!r}") from exc


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
