"""Structured output and tool calling at the HTTP layer.

`output_constraint` turns `response_format` / `tools` + `tool_choice`, and `guided_constraint`
vLLM's structured-output fields (regex, choice, JSON, lark grammar), into the engine's
`OutputConstraint` (compiled by the runtime in `check_constraint` before the request is
accepted), and `ToolOutput` turns a choice's generated text into OpenAI `tool_calls`, whole or
streamed.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from ..engine.model_info import ModelInfo
from ..engine.types import OutputConstraint
from ..errors import InvalidRequestError
from ..protocol.chat import (
    ChatCompletionRequest,
    NamedToolChoice,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
)
from ..protocol.common import GUIDED_FIELDS, SamplingRequest
from ..protocol.openai import to_json
from ..protocol.tool_calls import ToolCallFormat, ToolCallStreamParser, parse_tool_calls
from .streaming import in_thread


def tool_mode(req: ChatCompletionRequest) -> bool:
    """Whether the reply may contain tool calls (tools given and tool_choice not "none")."""
    return bool(req.tools) and req.tool_choice != "none"


def output_constraint(
    req: ChatCompletionRequest, call_format: str, parallel_default: bool = True
) -> OutputConstraint | None:
    """The engine constraint for a request; `parallel_default` is parallel_tool_calls when the
    request does not set it (service.ModelInfo.parallel_tool_calls)."""
    fmt = req.response_format
    constrained_format = isinstance(fmt, ResponseFormatJsonObject | ResponseFormatJsonSchema)
    if tool_mode(req):
        if constrained_format:
            raise InvalidRequestError(
                "response_format json_object/json_schema together with tools is not supported; "
                "use tool_choice='none' or drop response_format.",
                param="response_format",
            )
        assert req.tools is not None
        raw = req.tool_choice if req.tool_choice is not None else "auto"
        choice = raw.function.name if isinstance(raw, NamedToolChoice) else raw
        return OutputConstraint(
            kind="tools",
            tools=json.dumps([to_json(t) for t in req.tools]),
            tool_choice=choice,
            parallel=parallel_default
            if req.parallel_tool_calls is None
            else req.parallel_tool_calls,
            call_format=call_format,
        )
    if isinstance(fmt, ResponseFormatJsonSchema):
        spec = fmt.json_schema
        schema = spec.schema if spec.schema is not None else {"type": "object"}
        return OutputConstraint(
            kind="json_schema", schema=json.dumps(schema), strict=bool(spec.strict)
        )
    if isinstance(fmt, ResponseFormatJsonObject):
        if fmt.schema is not None:
            return OutputConstraint(kind="json_schema_string", schema=fmt.schema)
        return OutputConstraint(kind="json_object")
    return None


def guided_constraint(req: SamplingRequest) -> tuple[OutputConstraint, str] | None:
    """The constraint of vLLM's structured-output fields (protocol/vllm.py), with the name of
    the field that set it; None when the request has none. The protocol allows at most one."""
    so = req.structured_outputs
    if so is not None:
        json_value: object = so.json
        regex, choice, grammar, param = so.regex, so.choice, so.grammar, "structured_outputs"
        if so.json_object:
            return OutputConstraint(kind="json_object"), param
    else:
        json_value, regex, choice, grammar = (
            req.guided_json,
            req.guided_regex,
            req.guided_choice,
            req.guided_grammar,
        )
        param = next((n for n in GUIDED_FIELDS if getattr(req, n) is not None), "")
    if json_value is not None:
        if isinstance(json_value, str):
            return OutputConstraint(kind="json_schema_string", schema=json_value), param
        return OutputConstraint(kind="json_schema", schema=json.dumps(json_value)), param
    if regex is not None:
        return OutputConstraint(kind="regex", schema=regex), param
    if choice is not None:
        return OutputConstraint(kind="choice", schema=json.dumps(list(choice))), param
    if grammar is not None:
        return OutputConstraint(kind="grammar", schema=grammar), param
    return None


async def check_constraint(
    info: ModelInfo, model_name: str, constraint: OutputConstraint, param: str, *, rename: bool
) -> None:
    """Refuse (400) a constraint the model cannot apply or compile, naming `param`; with
    `rename`, a compile error names `param` too (the grammar compiler names response_format or
    tools). The compile runs off the event loop."""
    if info.check_constraint is None:
        raise InvalidRequestError(
            f"The model {model_name} does not support constrained output "
            "(response_format / tools / structured outputs).",
            param=param,
        )
    try:
        await in_thread(info.check_constraint, constraint)
    except InvalidRequestError as exc:
        if not rename:
            raise
        raise InvalidRequestError(exc.message, param=param) from None


async def chat_constraint(
    req: ChatCompletionRequest, info: ModelInfo, model_name: str
) -> OutputConstraint | None:
    """The checked constraint of a chat request: response_format / tools, or vLLM's fields
    (the protocol refuses both together)."""
    constraint = output_constraint(req, info.tool_call_format, info.parallel_tool_calls)
    param = "tools" if constraint is not None and constraint.kind == "tools" else "response_format"
    guided = guided_constraint(req)
    if guided is not None:
        constraint, param = guided
    if constraint is not None:
        await check_constraint(info, model_name, constraint, param, rename=guided is not None)
    return constraint


def as_call_format(name: str) -> ToolCallFormat:
    if name not in ("hermes", "llama3_json", "mistral"):
        raise ValueError(f"unknown tool-call format {name!r}")
    return name  # type: ignore[return-value]


@attrs.define
class ToolOutput:
    """Parses one choice's text into content + tool calls (stream or whole)."""

    call_format: str
    _parser: ToolCallStreamParser = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._parser = ToolCallStreamParser(as_call_format(self.call_format))

    def push(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """Streamed: the content and tool-call deltas that became final with `text`."""
        delta = self._parser.push(text) if text else None
        content = delta.content if delta else ""
        calls = [to_json(c) for c in delta.tool_calls] if delta else []
        if final:
            end = self._parser.finish()
            content += end.content
            calls += [to_json(c) for c in end.tool_calls]
        return content, calls

    def finish_reason(self, reason: str) -> str:
        return self._parser.finish_reason(reason)

    @staticmethod
    def whole(text: str, call_format: str, reason: str) -> dict[str, Any]:
        """Non-streamed: the message fields and finish_reason for the whole reply."""
        parsed = parse_tool_calls(text, as_call_format(call_format))
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content, "refusal": None}
        if parsed.tool_calls:
            message["tool_calls"] = [to_json(c) for c in parsed.tool_calls]
        return {"message": message, "finish_reason": parsed.finish_reason(reason)}
