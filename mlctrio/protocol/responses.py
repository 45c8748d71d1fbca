"""POST /v1/responses (stateless): the request mlctrio accepts.

Rules:
- Stateless: nothing is stored, so `store: true`, `background: true`, `previous_response_id`,
  `conversation` and item references are a 400 naming the field (send the whole conversation in
  `input`). Hosted tools (web_search, file_search, ...) are a 400; only `function` tools exist.
- Unknown keys are errors, as for chat (protocol/validate.py). Fields OpenAI defines that mlctrio
  cannot honour are in `UNSUPPORTED_FIELDS`: their default values are accepted and dropped.
- A message item may leave out `"type": "message"` (OpenAI's "easy input message").
- Reasoning items (as a reply gave them) and `reasoning` options are accepted: their meaning is
  protocol/responses_chat.py's, which maps the request onto its chat equivalent.
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


@attrs.frozen
class ReasoningText:
    type: Literal["reasoning_text"]
    text: str


@attrs.frozen
class SummaryText:
    type: Literal["summary_text"]
    text: str


@attrs.frozen(kw_only=True)
class ReasoningItem:
    """A reasoning item of an earlier reply, sent back: its text becomes the next assistant
    message's reasoning_content (its content, else its summary)."""

    type: Literal["reasoning"]
    summary: tuple[SummaryText, ...] = ()
    content: tuple[ReasoningText, ...] | None = None
    encrypted_content: None = None  # mlctrio writes none (nor can it read OpenAI's)
    id: str | None = None
    status: ItemStatus | None = None

    @property
    def text(self) -> str:
        return "".join(p.text for p in (self.content or self.summary))


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem

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
class ReasoningOptions:
    """`reasoning`: `effort` reaches the chat template as `reasoning_effort`, as chat's field
    does; mlctrio writes no summaries, so `summary` is accepted and changes nothing."""

    effort: chat.ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


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
    reasoning: ReasoningOptions | None = None
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


def _is_harmless_include(value: object) -> bool:
    # reasoning.encrypted_content (Codex asks for it) includes nothing: reasoning items carry
    # their text in `content`, never encrypted
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
