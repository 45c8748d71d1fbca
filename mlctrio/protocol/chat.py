"""POST /v1/chat/completions: the request mlctrio accepts (the responses it sends are in
protocol/chat_output.py).

The request classes accept the subset of OpenAI's schema that mlctrio can honour (plus vLLM's
sampling extensions, see SamplingRequest and protocol/vllm.py). Fields OpenAI defines but mlctrio
cannot honour are handled before structuring by `UNSUPPORTED_FIELDS` (protocol/openai.py), and so
are the SGLang extensions sglang-router adds (protocol/sglang.py) and the vLLM extensions mlctrio
cannot honour (protocol/vllm.py): a value mlctrio honours is accepted and dropped, anything else
is a 400 naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final, Literal

import attrs

from mlctrio.protocol import sglang, vllm
from mlctrio.protocol.common import GUIDED_FIELDS, OMIT, SamplingRequest
from mlctrio.protocol.validate import FieldError, constraints

#: OpenAI's rule for function and schema names.
NAME_PATTERN: Final = "^[a-zA-Z0-9_-]{1,64}$"
#: Chat template variables the server sets, which chat_template_kwargs may not override.
RESERVED_TEMPLATE_VARIABLES: Final = ("messages", "tools", "add_generation_prompt")

# --- messages -------------------------------------------------------------------------------


@attrs.frozen
class TextContentPart:
    """`{"type": "text", "text": ...}`: the only content part mlctrio reads (no images, audio)."""

    type: Literal["text"]
    text: str


#: Message content: a string or a list of text parts (the template joins the parts).
Content = str | tuple[TextContentPart, ...]


def content_text(content: Content | None) -> str:
    """The text of a message's content, parts concatenated without separators (as OpenAI)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


@attrs.frozen
class SystemMessage:
    role: Literal["system"]
    content: Content
    name: str | None = None


@attrs.frozen
class DeveloperMessage:
    """OpenAI's newer name for a system message; chat templates see it as "system"."""

    role: Literal["developer"]
    content: Content
    name: str | None = None


@attrs.frozen
class UserMessage:
    role: Literal["user"]
    content: Content
    name: str | None = None


@attrs.frozen
class FunctionCall:
    name: str
    #: JSON text, as the model produced it (OpenAI does not guarantee it parses).
    arguments: str


@attrs.frozen
class ToolCall:
    id: str
    type: Literal["function"]
    function: FunctionCall


@attrs.frozen
class AssistantMessage:
    """An earlier reply; `reasoning_content` (vLLM's `reasoning` too) is its think block, as
    mlctrio returned it: templates that render past reasoning (Qwen3's) read
    `message.reasoning_content`, and the others ignore it."""

    role: Literal["assistant"]
    content: Content | None = None
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] | None = None
    refusal: str | None = None
    reasoning_content: str | None = attrs.field(default=None, metadata=OMIT)
    reasoning: str | None = attrs.field(default=None, metadata=OMIT)

    def _check(self) -> None:
        if self.content is None and not self.tool_calls:
            raise FieldError("content is required unless tool_calls is given", ("content",))


@attrs.frozen
class ToolMessage:
    role: Literal["tool"]
    content: Content
    tool_call_id: str


ChatMessage = SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage

# --- tools and response formats -------------------------------------------------------------


@attrs.frozen
class FunctionDefinition:
    name: str = attrs.field(metadata=constraints(pattern=NAME_PATTERN))
    description: str | None = None
    #: A JSON Schema object describing the arguments.
    parameters: Mapping[str, object] | None = None
    strict: bool | None = None


@attrs.frozen
class Tool:
    type: Literal["function"]
    function: FunctionDefinition


@attrs.frozen
class FunctionName:
    name: str


@attrs.frozen
class NamedToolChoice:
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


@attrs.frozen
class ResponseFormatText:
    type: Literal["text"]


@attrs.frozen
class ResponseFormatJsonObject:
    type: Literal["json_object"]
    #: MLC extension: a JSON Schema as a string; absent means "any JSON object".
    schema: str | None = None

    def _check(self) -> None:
        if self.schema is None:
            return
        try:
            parsed = json.loads(self.schema)
        except ValueError:
            raise FieldError(
                "schema must be a JSON Schema encoded as a string", ("schema",)
            ) from None
        if not isinstance(parsed, dict):
            raise FieldError("schema must encode a JSON object", ("schema",))


@attrs.frozen
class JsonSchemaSpec:
    name: str = attrs.field(metadata=constraints(pattern=NAME_PATTERN))
    description: str | None = None
    schema: Mapping[str, object] | None = None
    strict: bool | None = None


@attrs.frozen
class ResponseFormatJsonSchema:
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema

# --- the request ----------------------------------------------------------------------------

#: OpenAI's reasoning_effort values (chat's field, the Responses API's `reasoning.effort`).
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high"]


@attrs.frozen(kw_only=True)
class ChatCompletionRequest(SamplingRequest):
    """A validated chat completion request.

    `max_tokens` (deprecated by OpenAI) and `max_completion_tokens` mean the same thing; when a
    client sends both, the smaller limit wins (see `max_output_tokens`), never a silent larger one.
    """

    messages: tuple[ChatMessage, ...] = attrs.field(metadata=constraints(minItems=1))
    max_completion_tokens: int | None = attrs.field(default=None, metadata=constraints(minimum=1))
    logprobs: bool | None = None
    top_logprobs: int | None = attrs.field(
        default=None, metadata=constraints(minimum=0, maximum=20)
    )
    response_format: ResponseFormat | None = None
    tools: tuple[Tool, ...] | None = attrs.field(
        default=None, metadata=constraints(minItems=1, maxItems=128)
    )
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM extensions (protocol/vllm.py): extra variables for the jinja chat template (e.g.
    # `enable_thinking`), and whether the prompt opens the assistant's turn
    chat_template_kwargs: Mapping[str, object] | None = None
    add_generation_prompt: bool | None = None
    # OpenAI's reasoning_effort: a chat template variable for models whose template reads it
    # (gpt-oss-style templates); chat_template_kwargs may set it too, and then wins
    reasoning_effort: ReasoningEffort | None = None

    def _check(self) -> None:
        super()._check()
        if self.top_logprobs is not None and self.logprobs is not True:
            raise FieldError("top_logprobs requires logprobs to be true", ("top_logprobs",))
        self._check_vendor_fields()
        if self.tool_choice is None or self.tool_choice in ("none", "auto"):
            return
        if not self.tools:
            raise FieldError("tool_choice requires tools", ("tool_choice",))
        if isinstance(self.tool_choice, NamedToolChoice):
            wanted = self.tool_choice.function.name
            if all(tool.function.name != wanted for tool in self.tools):
                raise FieldError(
                    f"tool_choice names function {wanted!r}, which is not in tools",
                    ("tool_choice", "function", "name"),
                )

    def template_kwargs(self) -> dict[str, object] | None:
        """The extra chat template variables: reasoning_effort, then chat_template_kwargs."""
        if self.reasoning_effort is None:
            return dict(self.chat_template_kwargs) if self.chat_template_kwargs else None
        return {"reasoning_effort": self.reasoning_effort, **(self.chat_template_kwargs or {})}

    def _check_vendor_fields(self) -> None:
        reserved = set(self.chat_template_kwargs or ()) & set(RESERVED_TEMPLATE_VARIABLES)
        if reserved:
            raise FieldError(
                f"{sorted(reserved)[0]!r} is set by the server, not by chat_template_kwargs",
                ("chat_template_kwargs", sorted(reserved)[0]),
            )
        guided = next((name for name in GUIDED_FIELDS if getattr(self, name) is not None), None)
        if guided is None:
            return
        if isinstance(self.response_format, ResponseFormatJsonObject | ResponseFormatJsonSchema):
            raise FieldError(f"response_format cannot be combined with {guided}", (guided,))
        if self.tools and self.tool_choice != "none":
            raise FieldError(
                f"tools cannot be combined with {guided} (unless tool_choice is 'none')", (guided,)
            )

    @property
    def max_output_tokens(self) -> int | None:
        """The generation limit: the smaller of max_tokens and max_completion_tokens if set."""
        limits = [t for t in (self.max_tokens, self.max_completion_tokens) if t is not None]
        return min(limits) if limits else None


def _is_text_modalities(value: object) -> bool:
    return value is None or value == ["text"]


#: OpenAI fields mlctrio cannot honour: name -> (accepts the value?, why). Accepted values are
#: defaults and are dropped before structuring; any other value is a 400 naming the field.
UNSUPPORTED_FIELDS: Final[Mapping[str, tuple[Any, str]]] = {
    "audio": (lambda v: v is None, "audio output is not supported"),
    "modalities": (_is_text_modalities, 'only ["text"] output is supported'),
    "prediction": (lambda v: v is None, "predicted outputs are not supported"),
    "web_search_options": (lambda v: v is None, "web search is not supported"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "only the default tier exists"),
    "store": (lambda v: v in (None, False), "stored completions are not supported"),
    "metadata": (lambda v: v is None or v == {}, "metadata requires store, not supported"),
    "verbosity": (lambda v: v is None, "verbosity is not supported"),
    "moderation": (lambda v: v is None, "moderation is not supported"),
    "functions": (lambda v: v is None, "functions is deprecated: use tools"),
    "function_call": (lambda v: v is None, "function_call is deprecated: use tool_choice"),
    # accepted and ignored: they only steer OpenAI's own caching and abuse detection
    "prompt_cache_key": (lambda v: v is None or isinstance(v, str), "must be a string"),
    "prompt_cache_retention": (lambda v: v is None or isinstance(v, str), "must be a string"),
    "safety_identifier": (lambda v: v is None or isinstance(v, str), "must be a string"),
    # SGLang's extensions, which sglang-router adds to every request it forwards
    **sglang.CHAT_FIELDS,
    # vLLM's extensions that mlctrio accepts with their defaults only
    **vllm.CHAT_FIELDS,
}
