"""POST /v1/chat/completions: the responses mlctrio sends, as the `openai` SDK types them
(openai.types.chat.ChatCompletion, ChatCompletionChunk). The request is protocol/chat.py's.

Rules: keys OpenAI always sends are plain fields (possibly null); keys OpenAI leaves out when
empty carry `OMIT` metadata. The server builds these values as plain dicts on its hot path
(server/generation.py); tests check those dicts against these classes and the OpenAPI schemas.
`reasoning_content` (vLLM's and llama.cpp's field, not OpenAI's) is there only when the reply had
a think block (protocol/reasoning.py).
"""

from __future__ import annotations

from typing import Literal

import attrs

from mlctrio.protocol.chat import ToolCall
from mlctrio.protocol.common import OMIT, OMITTED, ChunkUsage, Usage

#: OpenAI's values plus "abort" (request aborted: deadline, shutdown) and "error" (engine failure
#: reported on a choice), which mlctrio sends rather than pretending the output ended normally.
ChatFinishReason = Literal[
    "stop", "length", "tool_calls", "content_filter", "function_call", "abort", "error"
]


@attrs.frozen
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None


@attrs.frozen
class TokenLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...] | None
    top_logprobs: tuple[TopLogprob, ...]


@attrs.frozen
class ChoiceLogprobs:
    content: tuple[TokenLogprob, ...] | None
    refusal: tuple[TokenLogprob, ...] | None = None


@attrs.frozen(kw_only=True)
class ChatCompletionMessage:
    """The assistant's reply. OpenAI sends `content` and `refusal` as null, omits `tool_calls`."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: tuple[ToolCall, ...] | None = attrs.field(default=None, metadata=OMIT)
    #: The think block of a thinking model's reply; content is then null if nothing followed it.
    reasoning_content: str | None = attrs.field(default=None, metadata=OMIT)


@attrs.frozen(kw_only=True)
class ChatCompletionChoice:
    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: ChatFinishReason


@attrs.frozen(kw_only=True)
class ChatCompletion:
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: tuple[ChatCompletionChoice, ...]
    usage: Usage


@attrs.frozen
class DeltaFunctionCall:
    name: str | None = attrs.field(default=None, metadata=OMIT)
    arguments: str | None = attrs.field(default=None, metadata=OMIT)


@attrs.frozen
class DeltaToolCall:
    index: int
    id: str | None = attrs.field(default=None, metadata=OMIT)
    type: Literal["function"] | None = attrs.field(default=None, metadata=OMIT)
    function: DeltaFunctionCall | None = attrs.field(default=None, metadata=OMIT)


@attrs.frozen
class ChatCompletionDelta:
    """What one chunk adds; OpenAI omits the keys that add nothing (the last delta is `{}`)."""

    role: Literal["assistant"] | None = attrs.field(default=None, metadata=OMIT)
    content: str | None = attrs.field(default=None, metadata=OMIT)
    reasoning_content: str | None = attrs.field(default=None, metadata=OMIT)
    tool_calls: tuple[DeltaToolCall, ...] | None = attrs.field(default=None, metadata=OMIT)


@attrs.frozen
class ChatCompletionChunkChoice:
    index: int
    delta: ChatCompletionDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


@attrs.frozen(kw_only=True)
class ChatCompletionChunk:
    """One `data:` event of a streamed chat completion.

    `usage` is OMITTED (no key) unless the client set `stream_options.include_usage`; then it is
    None (`null`) on every chunk but the last, which has `choices == ()` and the usage.
    """

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: tuple[ChatCompletionChunkChoice, ...]
    usage: ChunkUsage = attrs.field(default=OMITTED, metadata=OMIT)
