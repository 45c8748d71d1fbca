"""POST /tokenize and POST /detokenize (vLLM's extension routes, same shapes)."""

from __future__ import annotations

import attrs

from mlctrio.protocol.chat import ChatMessage
from mlctrio.protocol.validate import constraints


@attrs.frozen(kw_only=True)
class TokenizeCompletionRequest:
    """Tokenize raw text; `add_special_tokens` defaults to true (BOS etc.), as in vLLM."""

    prompt: str
    model: str | None = None
    add_special_tokens: bool | None = None


@attrs.frozen(kw_only=True)
class TokenizeChatRequest:
    """Tokenize messages rendered by the chat template; `add_special_tokens` defaults to false
    (the template already writes them) and `add_generation_prompt` to true, as in vLLM."""

    messages: tuple[ChatMessage, ...] = attrs.field(metadata=constraints(minItems=1))
    model: str | None = None
    add_generation_prompt: bool | None = None
    add_special_tokens: bool | None = None


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


@attrs.frozen(kw_only=True)
class DetokenizeRequest:
    tokens: tuple[int, ...] = attrs.field(metadata=constraints(items={"minimum": 0}))
    model: str | None = None


@attrs.frozen
class TokenizeResponse:
    tokens: tuple[int, ...]
    count: int
    max_model_len: int


@attrs.frozen
class DetokenizeResponse:
    prompt: str
