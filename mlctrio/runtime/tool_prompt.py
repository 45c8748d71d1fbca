"""Tools for chat templates that know nothing of tools (llama.cpp's / minja's polyfills).

Many chat templates (SmolLM2's chatml, Llama 2, ...) ignore `tools`, drop an assistant message's
`tool_calls` and concatenate `message['content']` with strings (so a None content fails). Like
llama.cpp, mlctrio finds out what a template renders by rendering probes (`probe_caps`), then
`polyfill` rewrites the messages so that the template shows the model everything:

* tools not rendered: a system-message addition lists the tools as JSON (indent 2) and shows
  the reply format, in the model's tool-call format (the one the grammar forces and the parser
  reads: hermes `<tool_call>\\n{json}\\n</tool_call>` for chatml). It is appended to a leading
  system message, else it becomes one (as llama.cpp's `add_system`).
* tool_calls not rendered: the calls are written into the content, in that same format (after
  the content, if any), and `tool_calls` is removed.
* tool results not rendered: a "tool" message becomes a "user" message holding the result
  (`<tool_response>\\n...\\n</tool_response>` for hermes, minja's JSON otherwise).
* a None (or missing) content is always "" (llama.cpp's `requires_non_null_content`).

A probe that raises counts as "not rendered". `detect_call_format` is the rule that picks the
model's tool-call format from its template source.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from mlctrio.protocol.tool_calls import ToolCallFormat

__all__ = [
    "TemplateCaps",
    "detect_call_format",
    "polyfill",
    "probe_caps",
    "render_tool_calls",
    "tools_system_prompt",
]

Render = Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], str]

_PROBE_TOOL = "mlctrio_probe_tool"
_PROBE_ARG = "mlctrio_probe_argument"
_PROBE_RESULT = "mlctrio_probe_result"
_PROBE_USER: dict[str, Any] = {"role": "user", "content": "Hello"}
_EXAMPLE = {"name": "tool_name", "arguments": {"arg1": "some_value"}}


def detect_call_format(source: str, name: str = "") -> ToolCallFormat:
    """The model's tool-call text format from its template source(s) (hermes when unknown)."""
    if "[TOOL_CALLS]" in source or name.startswith("mistral"):
        return "mistral"
    if "<tool_call>" in source:
        return "hermes"
    if "<|python_tag|>" in source or "ipython" in source or name.startswith("llama-3"):
        return "llama3_json"
    return "hermes"


def _call_json(name: Any, arguments: Any, call_format: ToolCallFormat) -> str:
    key = "parameters" if call_format == "llama3_json" else "arguments"
    return json.dumps({"name": name, key: arguments}, ensure_ascii=False)


def render_tool_calls(calls: Sequence[Mapping[str, Any]], call_format: ToolCallFormat) -> str:
    """OpenAI tool calls (arguments parsed or as text) as the model writes them: exactly what
    the tool grammar produces and protocol.tool_calls parses."""
    bodies = []
    for call in calls:
        fn = call.get("function", call)
        fn = fn if isinstance(fn, Mapping) else {}
        bodies.append(_call_json(fn.get("name"), fn.get("arguments", {}), call_format))
    if call_format == "hermes":
        return "\n".join(f"<tool_call>\n{body}\n</tool_call>" for body in bodies)
    if call_format == "mistral":
        return "[TOOL_CALLS][" + ", ".join(bodies) + "]"
    return "; ".join(bodies)


def _without_nulls(value: Any) -> Any:
    """Drop null-valued keys (a parsed request spells out every omitted field as None)."""
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def tools_system_prompt(tools: Sequence[Mapping[str, Any]], call_format: ToolCallFormat) -> str:
    """The system-message addition that describes the tools and the reply format."""
    listed = json.dumps(_without_nulls(list(tools)), ensure_ascii=False, indent=2)
    example = render_tool_calls([_EXAMPLE], call_format)
    return (
        f"You can call any of the following tools to satisfy the user's requests: {listed}\n\n"
        f"To call a tool, reply with exactly this syntax (one call per tool):\n\n{example}\n\n"
        "Otherwise, answer the user directly."
    )


def _tool_response(msg: Mapping[str, Any], call_format: ToolCallFormat) -> str:
    content = msg.get("content")
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    if call_format == "hermes":
        return f"<tool_response>\n{text}\n</tool_response>"
    response: dict[str, Any] = {"tool": msg.get("name"), "content": content}
    if msg.get("tool_call_id"):
        response["tool_call_id"] = msg["tool_call_id"]
    return json.dumps({"tool_response": response}, ensure_ascii=False, indent=2)


@attrs.frozen
class TemplateCaps:
    """What one chat template renders (found by `probe_caps`)."""

    renders_tools: bool = True
    renders_tool_calls: bool = True
    renders_tool_responses: bool = True


def _try(render: Render, messages: list[dict[str, Any]], tools: Any = None) -> str | None:
    try:
        return render(messages, tools)
    except Exception:  # any failure of a probe means "not rendered"
        return None


def probe_caps(render: Render) -> TemplateCaps:
    """Render probes: with and without a tool, an assistant tool call, a tool result."""
    parameters = {"type": "object", "properties": {_PROBE_ARG: {"type": "string"}}}
    function = {"name": _PROBE_TOOL, "description": "probe", "parameters": parameters}
    tool = {"type": "function", "function": function}
    with_tool = _try(render, [dict(_PROBE_USER)], [tool])
    without = _try(render, [dict(_PROBE_USER)])
    call = {"id": "123456789", "type": "function",
            "function": {"name": _PROBE_TOOL, "arguments": {_PROBE_ARG: "x"}}}  # fmt: skip
    calling = [dict(_PROBE_USER), {"role": "assistant", "content": "", "tool_calls": [call]}]
    called = _try(render, calling)
    answering = [
        dict(_PROBE_USER),
        {"role": "assistant", "content": "Let me check."},
        {
            "role": "tool",
            "tool_call_id": "123456789",
            "name": _PROBE_TOOL,
            "content": _PROBE_RESULT,
        },
    ]
    answered = _try(render, answering)
    return TemplateCaps(
        renders_tools=with_tool is not None and with_tool != without,
        renders_tool_calls=called is not None and _PROBE_TOOL in called,
        renders_tool_responses=answered is not None and _PROBE_RESULT in answered,
    )


def needs_caps(messages: Sequence[Mapping[str, Any]], tools: Any) -> bool:
    """Whether rendering these messages depends on the template's caps at all."""
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def non_null_content(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A None or missing content becomes "" (templates concatenate it with strings)."""
    return [m if m.get("content") is not None else {**m, "content": ""} for m in messages]


def _add_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages and messages[0].get("role") in ("system", "developer"):
        first = messages[0]
        content = str(first.get("content") or "")
        joined = f"{content}\n\n{text}" if content else text
        return [{**first, "content": joined}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def polyfill(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    caps: TemplateCaps,
    call_format: ToolCallFormat,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (already normalized) and tools rewritten for what the template cannot render.

    Returns the tools to pass on: None once they went into the system message."""
    out = []
    for msg in non_null_content(messages):
        if msg.get("tool_calls") and not caps.renders_tool_calls:
            calls = render_tool_calls(msg["tool_calls"], call_format)
            content = msg["content"]
            text = f"{content}\n{calls}" if isinstance(content, str) and content else calls
            msg = {k: v for k, v in msg.items() if k != "tool_calls"} | {"content": text}
        elif msg.get("role") == "tool" and not caps.renders_tool_responses:
            msg = {"role": "user", "content": _tool_response(msg, call_format)}
        out.append(msg)
    if tools and not caps.renders_tools:
        return _add_system(out, tools_system_prompt(tools, call_format)), None
    return out, tools
