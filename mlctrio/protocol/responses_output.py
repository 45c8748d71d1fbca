"""POST /v1/responses: the response object and its output items, as the `openai` SDK types them
(openai.types.responses.Response, ResponseOutputMessage, ResponseFunctionToolCall,
ResponseReasoningItem).

Rules: keys OpenAI always sends are plain fields (possibly null); the server builds these values
and serialises them with protocol.openai.to_json, whole or inside stream events. Streamed events
are plain dicts (server/responses_events.py); `STREAM_EVENT_SCHEMA` documents their common part.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Final, Literal

import attrs

from mlctrio.protocol.responses import (
    FunctionTool,
    ItemStatus,
    ReasoningOptions,
    TextConfig,
    ToolChoice,
)

ResponseStatus = Literal["completed", "incomplete", "failed", "in_progress"]


def new_item_id(prefix: str) -> str:
    """An OpenAI-style object id: `resp_`, `msg_`, `fc_`, `rs_` and 48 hex digits."""
    return f"{prefix}_{secrets.token_hex(24)}"


@attrs.frozen
class OutputTextContent:
    type: Literal["output_text"]
    text: str
    annotations: tuple[object, ...] = ()
    logprobs: tuple[object, ...] = ()


@attrs.frozen(kw_only=True)
class OutputMessage:
    id: str
    type: Literal["message"] = "message"
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: tuple[OutputTextContent, ...]


@attrs.frozen(kw_only=True)
class OutputFunctionCall:
    id: str
    type: Literal["function_call"] = "function_call"
    status: ItemStatus
    call_id: str
    name: str
    arguments: str


@attrs.frozen
class OutputReasoningText:
    type: Literal["reasoning_text"]
    text: str


@attrs.frozen(kw_only=True)
class OutputReasoning:
    """A thinking model's think block (as vLLM returns it: the text in `content`, no summary,
    nothing encrypted); it comes before the message or calls it led to."""

    id: str
    type: Literal["reasoning"] = "reasoning"
    status: ItemStatus
    summary: tuple[object, ...] = ()
    content: tuple[OutputReasoningText, ...]
    encrypted_content: None = None


OutputItem = OutputMessage | OutputFunctionCall | OutputReasoning


@attrs.frozen
class InputTokensDetails:
    cached_tokens: int = 0
    cache_write_tokens: int = 0


@attrs.frozen
class OutputTokensDetails:
    reasoning_tokens: int = 0


@attrs.frozen(kw_only=True)
class ResponseUsage:
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


@attrs.frozen
class IncompleteDetails:
    reason: Literal["max_output_tokens"]


@attrs.frozen
class ResponseError:
    """`error` of a failed response (openai.types.responses.ResponseError)."""

    code: str
    message: str


@attrs.frozen(kw_only=True)
class ResponseObject:
    """The `response` object: the whole reply, and the payload of the lifecycle events."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: tuple[OutputItem, ...] = ()
    parallel_tool_calls: bool
    previous_response_id: None = None
    reasoning: ReasoningOptions | None = None
    store: Literal[False] = False
    temperature: float | None
    text: TextConfig
    tool_choice: ToolChoice
    tools: tuple[FunctionTool, ...]
    top_p: float | None
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None
    metadata: Mapping[str, str]


#: What every streamed event has: a `type` (response.created, response.output_text.delta, ...)
#: and a `sequence_number` counting from 0; the rest is as OpenAI documents each type.
STREAM_EVENT_SCHEMA: Final = {
    "type": "object",
    "required": ["type", "sequence_number"],
    "properties": {
        "type": {"type": "string"},
        "sequence_number": {"type": "integer", "minimum": 0},
        "response": {"$ref": "#/components/schemas/ResponseObject"},
    },
}
