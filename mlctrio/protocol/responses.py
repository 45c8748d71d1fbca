"""POST /v1/responses (stateless): the request mlctrio accepts, and its chat equivalent.

Rules:
- Stateless: nothing is stored, so `store: true`, `background: true`, `previous_response_id`,
  `conversation` and item references are a 400 naming the field (send the whole conversation in
  `input`). Hosted tools (web_search, file_search, ...) are a 400; only `function` tools exist.
- Unknown keys are errors, as for chat (protocol/validate.py). Fields OpenAI defines that mlctrio
  cannot honour are in `UNSUPPORTED_FIELDS`: their default values are accepted and dropped.
- A message item may leave out `"type": "message"` (OpenAI's "easy input message").
- `to_chat_request` maps the request onto a `ChatCompletionRequest`, so the chat pipeline
  (template, tools, constraints, sampling) serves it unchanged: `instructions` becomes the first
  system message, consecutive function_call items one assistant message with `tool_calls`, a
  function_call_output a tool message, `text.format` the matching `response_format`.
- The response classes are in protocol/responses_output.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

import attrs

from mlctrio.protocol import chat
from mlctrio.protocol.chat import NAME_PATTERN
from mlctrio.protocol.openai import parse_body
from mlctrio.protocol.validate import FieldError, constraints

ItemStatus = Literal["in_progress", "completed", "incomplete"]

# --- input items ----------------------------------------------------------------------------


@attrs.frozen
class InputText:
    type: Literal["input_text"]
    text: str


@attrs.frozen(kw_only=True)
class OutputText:
    """An assistant's text, as a previous response's output item carries it back."""

    type: Literal["output_text"]
    text: str
    annotations: tuple[object, ...] = ()
    logprobs: tuple[object, ...] | None = None


@attrs.frozen
class Refusal:
    type: Literal["refusal"]
    refusal: str


MessagePart = InputText | OutputText | Refusal


@attrs.frozen(kw_only=True)
class MessageItem:
    type: Literal["message"]
    role: Literal["user", "assistant", "system", "developer"]
    content: str | tuple[MessagePart, ...]
    id: str | None = None
    status: ItemStatus | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.refusal if isinstance(p, Refusal) else p.text for p in self.content)


@attrs.frozen(kw_only=True)
class FunctionCallItem:
    type: Literal["function_call"]
    call_id: str
    name: str
    #: JSON text, as the model produced it.
    arguments: str
    id: str | None = None
    status: ItemStatus | None = None


@attrs.frozen(kw_only=True)
class FunctionCallOutputItem:
    type: Literal["function_call_output"]
    call_id: str
    output: str | tuple[InputText, ...]
    id: str | None = None
    status: ItemStatus | None = None

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem

# --- tools and text format ------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class FunctionTool:
    """A function tool in the Responses API's flat shape (no nested `function` object)."""

    type: Literal["function"]
    name: str = attrs.field(metadata=constraints(pattern=NAME_PATTERN))
    description: str | None = None
    parameters: Mapping[str, object] | None = None
    strict: bool | None = None


@attrs.frozen
class ToolChoiceFunction:
    type: Literal["function"]
    name: str


ToolChoice = Literal["none", "auto", "required"] | ToolChoiceFunction


@attrs.frozen
class TextFormatText:
    type: Literal["text"]


@attrs.frozen
class TextFormatJsonObject:
    type: Literal["json_object"]


@attrs.frozen(kw_only=True)
class TextFormatJsonSchema:
    type: Literal["json_schema"]
    name: str = attrs.field(metadata=constraints(pattern=NAME_PATTERN))
    schema: Mapping[str, object]
    description: str | None = None
    strict: bool | None = None


TextFormat = TextFormatText | TextFormatJsonObject | TextFormatJsonSchema


@attrs.frozen
class TextConfig:
    format: TextFormat | None = None
    #: Only OpenAI's default: mlctrio has no verbosity control.
    verbosity: Literal["medium"] | None = None


@attrs.frozen
class ResponsesStreamOptions:
    #: OpenAI pads deltas against side channels; mlctrio does not, so either value is honoured.
    include_obfuscation: bool | None = None


# --- the request ----------------------------------------------------------------------------


def _field(**keywords: object) -> Any:
    return attrs.field(default=None, metadata=constraints(**keywords))


@attrs.frozen(kw_only=True)
class ResponsesRequest:
    """A validated POST /v1/responses body."""

    model: str
    input: str | tuple[InputItem, ...] = attrs.field(metadata=constraints(minItems=1))
    instructions: str | None = None
    max_output_tokens: int | None = _field(minimum=1)
    temperature: float | None = _field(minimum=0, maximum=2)
    top_p: float | None = _field(exclusiveMinimum=0, maximum=1)
    tools: tuple[FunctionTool, ...] | None = _field(maxItems=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = None
    stream_options: ResponsesStreamOptions | None = None
    #: Echoed back on the response, as OpenAI does.
    metadata: Mapping[str, str] | None = None
    user: str | None = None

    def _check(self) -> None:
        if self.stream_options is not None and self.stream is not True:
            raise FieldError(
                "stream_options is only allowed when stream is true", ("stream_options",)
            )
        self._check_tool_choice()
        if isinstance(self.input, str):
            return
        calls: set[str] = set()
        for index, item in enumerate(self.input):
            if isinstance(item, FunctionCallItem):
                calls.add(item.call_id)
            elif isinstance(item, FunctionCallOutputItem) and item.call_id not in calls:
                raise FieldError(
                    f"no function_call item with call_id {item.call_id!r} precedes this output "
                    "(mlctrio is stateless: send the function_call items back in input)",
                    ("input", index, "call_id"),
                )

    def _check_tool_choice(self) -> None:
        if self.tool_choice is None or self.tool_choice in ("none", "auto"):
            return
        if not self.tools:
            raise FieldError("tool_choice requires tools", ("tool_choice",))
        if isinstance(self.tool_choice, ToolChoiceFunction):
            wanted = self.tool_choice.name
            if all(tool.name != wanted for tool in self.tools):
                raise FieldError(
                    f"tool_choice names function {wanted!r}, which is not in tools",
                    ("tool_choice", "name"),
                )

    @property
    def text_format(self) -> TextFormat:
        fmt = self.text.format if self.text is not None else None
        return fmt if fmt is not None else TextFormatText("text")


def _only(*allowed: object) -> Any:
    return lambda v: any(v is a or (v == a and type(v) is type(a)) for a in allowed)


def _is_empty_reasoning(value: object) -> bool:
    return value is None or (isinstance(value, dict) and all(v is None for v in value.values()))


def _is_harmless_include(value: object) -> bool:
    # reasoning.encrypted_content (Codex asks for it) includes nothing: mlctrio emits no reasoning
    return value is None or (
        isinstance(value, list) and all(v == "reasoning.encrypted_content" for v in value)
    )


_STATELESS: Final = "mlctrio is stateless: send the whole conversation in input"

#: OpenAI fields mlctrio cannot honour: name -> (accepts the value?, why). Accepted values are
#: defaults and are dropped before structuring; any other value is a 400 naming the field.
UNSUPPORTED_FIELDS: Final[Mapping[str, tuple[Any, str]]] = {
    "store": (_only(None, False), f"stored responses are not supported ({_STATELESS})"),
    "previous_response_id": (_only(None), f"no response is kept ({_STATELESS})"),
    "conversation": (_only(None), f"conversations are not supported ({_STATELESS})"),
    "background": (_only(None, False), "background responses are not supported"),
    "prompt": (_only(None), "stored prompts are not supported"),
    "reasoning": (_is_empty_reasoning, "reasoning options are not supported"),
    "include": (_is_harmless_include, "only 'reasoning.encrypted_content' can be included"),
    "service_tier": (_only(None, "auto", "default"), "only the default tier exists"),
    "truncation": (_only(None, "disabled"), "only 'disabled' truncation is supported"),
    "top_logprobs": (_only(None, 0), "logprobs are not supported on /v1/responses"),
    "max_tool_calls": (_only(None), "max_tool_calls is not supported"),
    # accepted and ignored: they only steer OpenAI's own caching and abuse detection
    "prompt_cache_key": (lambda v: v is None or isinstance(v, str), "must be a string"),
    "prompt_cache_retention": (lambda v: v is None or isinstance(v, str), "must be a string"),
    "safety_identifier": (lambda v: v is None or isinstance(v, str), "must be a string"),
}


def _with_message_types(items: object) -> object:
    """Input items with the `"type": "message"` OpenAI lets message items leave out."""
    if not isinstance(items, list):
        return items
    return [
        {"type": "message", **item} if isinstance(item, dict) and "type" not in item else item
        for item in items
    ]


def parse_responses_request(body: object) -> ResponsesRequest:
    """Validate a POST /v1/responses body (InvalidRequestError with `param`, nothing else)."""
    return parse_body(body, ResponsesRequest, UNSUPPORTED_FIELDS, _prepare)


def _prepare(fields: dict[str, Any]) -> None:
    if "input" in fields:
        fields["input"] = _with_message_types(fields["input"])


# --- the chat equivalent --------------------------------------------------------------------


def _message(item: MessageItem) -> chat.ChatMessage:
    text = item.text
    if item.role == "user":
        return chat.UserMessage("user", text)
    if item.role == "system":
        return chat.SystemMessage("system", text)
    if item.role == "developer":
        return chat.DeveloperMessage("developer", text)
    return chat.AssistantMessage("assistant", text)


def chat_messages(req: ResponsesRequest) -> tuple[chat.ChatMessage, ...]:
    """The conversation as chat messages (see the module rules)."""
    out: list[chat.ChatMessage] = []
    if req.instructions is not None:
        out.append(chat.SystemMessage("system", req.instructions))
    items = (
        (MessageItem(type="message", role="user", content=req.input),)
        if isinstance(req.input, str)
        else req.input
    )
    for item in items:
        if isinstance(item, MessageItem):
            out.append(_message(item))
        elif isinstance(item, FunctionCallOutputItem):
            out.append(chat.ToolMessage("tool", item.text, item.call_id))
        else:
            call = chat.ToolCall(
                item.call_id, "function", chat.FunctionCall(item.name, item.arguments)
            )
            last = out[-1] if out else None
            if isinstance(last, chat.AssistantMessage):  # one assistant turn: text, then calls
                out[-1] = attrs.evolve(last, tool_calls=(*(last.tool_calls or ()), call))
            else:
                out.append(chat.AssistantMessage("assistant", None, tool_calls=(call,)))
    return tuple(out)


def _response_format(fmt: TextFormat) -> chat.ResponseFormat:
    if isinstance(fmt, TextFormatJsonSchema):
        spec = chat.JsonSchemaSpec(fmt.name, fmt.description, fmt.schema, fmt.strict)
        return chat.ResponseFormatJsonSchema("json_schema", spec)
    if isinstance(fmt, TextFormatJsonObject):
        return chat.ResponseFormatJsonObject("json_object")
    return chat.ResponseFormatText("text")


def _tool(tool: FunctionTool) -> chat.Tool:
    fn = chat.FunctionDefinition(tool.name, tool.description, tool.parameters, tool.strict)
    return chat.Tool("function", fn)


def _tool_choice(choice: ToolChoice | None) -> chat.ToolChoice | None:
    if isinstance(choice, ToolChoiceFunction):
        return chat.NamedToolChoice("function", chat.FunctionName(choice.name))
    return choice


def to_chat_request(req: ResponsesRequest) -> chat.ChatCompletionRequest:
    """The chat completion request that generates this response (validated already)."""
    return chat.ChatCompletionRequest(
        model=req.model,
        messages=chat_messages(req),
        max_completion_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stream=req.stream,
        user=req.user,
        response_format=_response_format(req.text_format),
        tools=tuple(_tool(t) for t in req.tools) if req.tools else None,
        tool_choice=_tool_choice(req.tool_choice),
        parallel_tool_calls=req.parallel_tool_calls,
    )
