"""MLC conversation templates: `ConvTemplate` renders a prompt the way MLC's
`Conversation.as_prompt` does (plus tools and tool calls), `CONV_PRESETS` holds MLC's presets as
MLC's JSON, and `conv_template_from_config` builds a template from mlc-chat-config.json's
`conv_template` and the model's tokenizer. `normalize_messages`, shared with the HF jinja
templates, lives here too so that mlctrio.runtime.chat_template (which re-exports all of these)
depends on this module and not the other way round.

Tools and tool calls follow the model's tool-call format (`ConvTemplate.call_format`, the one the
grammar forces and the parser reads): the tools are described as runtime/tool_prompt.py does for
HF templates that ignore them, and calls are written in that format unless the template gives a
`tool_call_template`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs

from mlctrio.engine.tokens import Tokenizer
from mlctrio.errors import InvalidRequestError, ModelLoadError
from mlctrio.protocol.tool_calls import ToolCallFormat
from mlctrio.runtime.tool_prompt import detect_call_format, render_tool_calls, tools_system_prompt

__all__ = [
    "CONV_PRESETS",
    "ConvTemplate",
    "conv_template_from_config",
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
        # Gemma's own template puts the system prompt at the top of the first user turn; MLC's
        # gemma3_instruction writes it bare before the turn, which the model never saw.
        "gemma3_instruction": {
            "system_template": f"<start_of_turn>user\n{_SYSTEM}\n\n",
            "system_message": "",
            "roles": {
                "user": "<start_of_turn>user",
                "assistant": "<start_of_turn>model",
                "tool": "<start_of_turn>user",
            },
            "seps": ["<end_of_turn>\n"],
            "role_content_sep": "\n",
            "role_empty_sep": "\n",
            "stop_str": ["<end_of_turn>"],
            "stop_tokens": ["<end_of_turn>", "<eos>"],
            "add_role_after_system_message": False,
            "render_empty_system": False,
            "bos": True,
        },
    }
)
_ALIASES: Mapping[str, str] = {
    "gemma_instruction": "gemma3_instruction",
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

    @property
    def call_format(self) -> ToolCallFormat:
        """The model's tool-call format (from the tool-call template and the name)."""
        return detect_call_format(self.tool_call_template, self.name)

    def _system(self, messages: list[dict[str, Any]], tools: Any) -> str:
        texts = [str(m.get("content") or "") for m in messages if m.get("role") in _SYSTEM_ROLES]
        system = "\n\n".join(texts) if texts else self.system_message
        uses_placeholder = any(
            _FUNCTIONS in t for t in (self.system_template, *self.role_templates.values())
        )
        if tools and not uses_placeholder:
            described = tools_system_prompt(tools, self.call_format)
            system = (f"{system}\n\n" if system else "") + described
        if not system and not self.render_empty_system:
            return ""
        return self.system_template.replace(_SYSTEM, system)

    def _content(self, msg: dict[str, Any]) -> str:
        text = msg.get("content")
        text = "" if text is None else str(text)
        calls = []
        tool_calls = [c for c in msg.get("tool_calls") or [] if isinstance(c, dict)]
        if tool_calls and self.tool_call_template == "{tool_call}":
            calls.append(render_tool_calls(tool_calls, self.call_format))
        for call in tool_calls if self.tool_call_template != "{tool_call}" else []:
            fn = call.get("function", call)
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
        template_kwargs: Mapping[str, Any] | None = None,  # no jinja: nothing reads them
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
