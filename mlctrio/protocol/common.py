"""Schema pieces shared by chat and text completions: sampling fields, usage, models, errors.

Request fields are `X | None = None` where OpenAI accepts `null` ("use the default"); the server,
not this module, decides defaults, so a request records exactly what the client asked for.
Responses mirror the `openai` SDK's types (field names and nullability): a key OpenAI always sends,
possibly as null, is a plain field; a key OpenAI leaves out when empty carries `OMIT` metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

import attrs

from mlctrio.protocol.validate import OMIT_KEY, OMITTED, FieldError, Omitted, constraints
from mlctrio.protocol.vllm import StructuredOutputs

#: Field metadata: leave the key out of JSON output while it holds its default.
OMIT: Final = {OMIT_KEY: True}

#: OpenAI's limit is 4; vLLM accepts more, and so do we.
MAX_STOP_SEQUENCES: Final = 16
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
#: The request fields that each set a structured output constraint (at most one per request).
GUIDED_FIELDS: Final = (
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)


def _field(**keywords: object) -> Any:
    """An optional (nullable) request field with JSON Schema constraints."""
    return attrs.field(default=None, metadata=constraints(**keywords))


@attrs.frozen
class StreamOptions:
    """`stream_options`: only valid with `stream: true`."""

    include_usage: bool | None = None
    #: OpenAI pads deltas against side channels; mlctrio does not, so either value is honoured.
    include_obfuscation: bool | None = None


@attrs.frozen(kw_only=True)
class SamplingRequest:
    """Fields common to /v1/chat/completions and /v1/completions (OpenAI + vLLM extensions)."""

    model: str
    max_tokens: int | None = _field(minimum=1)
    n: int | None = _field(minimum=1, maximum=128)
    temperature: float | None = _field(minimum=0, maximum=2)
    top_p: float | None = _field(exclusiveMinimum=0, maximum=1)
    presence_penalty: float | None = _field(minimum=-2, maximum=2)
    frequency_penalty: float | None = _field(minimum=-2, maximum=2)
    #: token id -> bias; JSON keys are decimal strings (OpenAI), converted to ints here.
    logit_bias: Mapping[int, float] | None = attrs.field(
        default=None,
        metadata=constraints(additionalProperties={"minimum": -100, "maximum": 100}),
    )
    seed: int | None = _field(minimum=INT64_MIN, maximum=INT64_MAX)
    stop: str | tuple[str, ...] | None = _field(
        minLength=1, maxItems=MAX_STOP_SEQUENCES, items={"minLength": 1}
    )
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions (vLLM / MLC names) that the openai SDK sends through `extra_body` (the rules
    # are in protocol/vllm.py). top_k 0 or -1 means off, as in vLLM.
    top_k: int | None = _field(minimum=-1)
    min_p: float | None = _field(minimum=0, maximum=1)
    repetition_penalty: float | None = _field(exclusiveMinimum=0)
    ignore_eos: bool | None = None
    stop_token_ids: tuple[int, ...] | None = _field(items={"minimum": 0})
    skip_special_tokens: bool | None = None
    #: no stop token or stop string ends a choice before it has this many tokens
    min_tokens: int | None = _field(minimum=0)
    include_stop_str_in_output: bool | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: Mapping[str, object] | str | None = None
    guided_regex: str | None = None
    guided_choice: tuple[str, ...] | None = _field(minItems=1, items={"minLength": 1})
    guided_grammar: str | None = _field(minLength=1)
    #: accepted and ignored: llguidance is the only backend
    guided_decoding_backend: str | None = None

    def _check(self) -> None:
        if self.stream_options is not None and self.stream is not True:
            raise FieldError(
                "stream_options is only allowed when stream is true", ("stream_options",)
            )
        given = [name for name in GUIDED_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise FieldError(
                f"only one structured output constraint may be given, not {' and '.join(given)}",
                (given[1],),
            )

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        """`stop` as a tuple whatever form the client used."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else self.stop

    @property
    def include_usage(self) -> bool:
        """True when a streamed response must end with a usage chunk (and carry `usage: null`)."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# --- responses ------------------------------------------------------------------------------


@attrs.frozen
class PromptTokensDetails:
    cached_tokens: int = 0


@attrs.frozen
class CompletionTokensDetails:
    #: Tokens of the reply's think block (protocol/reasoning.py), part of completion_tokens.
    reasoning_tokens: int = 0


@attrs.frozen
class Usage:
    """`usage` of a completion (openai.types.CompletionUsage); the details are there only when
    they count something (cached prompt tokens, a think block)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = attrs.field(default=None, metadata=OMIT)
    completion_tokens_details: CompletionTokensDetails | None = attrs.field(
        default=None, metadata=OMIT
    )


#: Type of `usage` on stream chunks: OMITTED (key absent), None (`null`), or the final usage.
ChunkUsage = Usage | None | Literal[Omitted.OMITTED]


@attrs.frozen(kw_only=True)
class Model:
    """One entry of GET /v1/models (openai.types.Model plus vLLM's `root`, `max_model_len`)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mlctrio"
    root: str | None = attrs.field(default=None, metadata=OMIT)
    max_model_len: int | None = attrs.field(default=None, metadata=OMIT)


@attrs.frozen(kw_only=True)
class ModelList:
    object: Literal["list"] = "list"
    data: tuple[Model, ...]


@attrs.frozen
class ErrorDetail:
    message: str
    type: str
    param: str | None = None
    code: str | None = None


@attrs.frozen
class ErrorResponse:
    """The OpenAI error envelope `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail


__all__ = [
    "GUIDED_FIELDS",
    "INT64_MAX",
    "INT64_MIN",
    "MAX_STOP_SEQUENCES",
    "OMIT",
    "OMITTED",
    "ChunkUsage",
    "CompletionTokensDetails",
    "ErrorDetail",
    "ErrorResponse",
    "Model",
    "ModelList",
    "PromptTokensDetails",
    "SamplingRequest",
    "StreamOptions",
    "Usage",
]
