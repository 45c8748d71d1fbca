"""POST /v1/completions (legacy text completions): request and responses.

`prompt` may be one prompt (a string or a list of token ids) or a batch (a list of strings or a
list of token-id lists); OpenAI answers a batch with `len(prompts) * n` choices, choice `i * n + j`
being sample j of prompt i. `prompts` gives the batch in one shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal

import attrs

from mlctrio.protocol import sglang, vllm
from mlctrio.protocol.common import OMIT, OMITTED, ChunkUsage, SamplingRequest, Usage
from mlctrio.protocol.validate import FieldError, constraints

#: OpenAI's default `max_tokens` for text completions (chat has no such default).
DEFAULT_MAX_TOKENS: Final = 16

Prompt = str | tuple[str, ...] | tuple[int, ...] | tuple[tuple[int, ...], ...]


@attrs.frozen(kw_only=True)
class CompletionRequest(SamplingRequest):
    """A validated text completion request. `best_of` is accepted only when it equals n."""

    prompt: Prompt = attrs.field(
        metadata=constraints(
            minItems=1, items={"minimum": 0, "minItems": 1, "items": {"minimum": 0}}
        )
    )
    echo: bool | None = None
    logprobs: int | None = attrs.field(default=None, metadata=constraints(minimum=0, maximum=5))
    best_of: int | None = attrs.field(default=None, metadata=constraints(minimum=1, maximum=128))
    #: vLLM extension: add the tokenizer's special tokens (BOS) to string prompts (default true)
    add_special_tokens: bool | None = None

    def _check(self) -> None:
        super()._check()
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise FieldError("best_of other than n is not supported", ("best_of",))

    @property
    def prompts(self) -> tuple[str | tuple[int, ...], ...]:
        """The batch of prompts: each a string or a tuple of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return (prompt,)
        if all(isinstance(p, int) for p in prompt):
            return (prompt,)  # type: ignore[return-value]  # a single list of token ids
        return prompt  # type: ignore[return-value]  # a list of strings or of id lists

    @property
    def max_output_tokens(self) -> int:
        """The generation limit, OpenAI's default 16 when the client sent none."""
        return DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens


#: OpenAI fields mlctrio cannot honour (see chat.UNSUPPORTED_FIELDS).
UNSUPPORTED_FIELDS: Final = {
    "suffix": (lambda v: v is None or v == "", "suffix (insertion) is not supported"),
    **sglang.COMPLETION_FIELDS,  # what sglang-router adds to every request it forwards
    **vllm.COMPLETION_FIELDS,  # vLLM's extensions that mlctrio accepts with their defaults only
}

# --- responses ------------------------------------------------------------------------------

#: OpenAI's values plus "abort" and "error" (see chat.ChatFinishReason).
CompletionFinishReason = Literal["stop", "length", "content_filter", "abort", "error"]


@attrs.frozen
class CompletionLogprobs:
    """Legacy logprobs: parallel lists, one entry per token (top_logprobs: token -> logprob)."""

    tokens: tuple[str, ...]
    #: None for the first prompt token when echoing (it has no logprob)
    token_logprobs: tuple[float | None, ...]
    top_logprobs: tuple[Mapping[str, float] | None, ...]
    text_offset: tuple[int, ...]


@attrs.frozen(kw_only=True)
class CompletionChoice:
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    #: null on stream chunks before the last one of this choice
    finish_reason: CompletionFinishReason | None


@attrs.frozen(kw_only=True)
class Completion:
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: tuple[CompletionChoice, ...]
    usage: Usage


@attrs.frozen(kw_only=True)
class CompletionChunk:
    """One `data:` event of a streamed text completion (same `object` as the full response).

    `usage` follows the rule of ChatCompletionChunk.usage.
    """

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: tuple[CompletionChoice, ...]
    usage: ChunkUsage = attrs.field(default=OMITTED, metadata=OMIT)
