"""The OpenAI-compatible schema: parse request bodies, serialise responses.

    parse_chat_request(body)        -> ChatCompletionRequest
    parse_completion_request(body)  -> CompletionRequest
    parse_embedding_request(body)   -> EmbeddingRequest
    parse_tokenize_request(body)    -> TokenizeCompletionRequest | TokenizeChatRequest
    parse_detokenize_request(body)  -> DetokenizeRequest
    to_json(response)               -> dict, exactly the keys and nulls OpenAI sends
    to_json_bytes(response)         -> compact UTF-8 JSON (what an SSE `data:` line carries)

Every parse_* takes the decoded JSON body (any object) and either returns a frozen attrs value or
raises InvalidRequestError whose `param` is the dotted path of the offending value
("messages.0.content"); it raises nothing else, whatever the input.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

from mlctrio.errors import InvalidRequestError
from mlctrio.protocol import chat, completions
from mlctrio.protocol.chat import ChatCompletionRequest
from mlctrio.protocol.completions import CompletionRequest
from mlctrio.protocol.converter import make_converter
from mlctrio.protocol.embeddings import EmbeddingRequest
from mlctrio.protocol.tokenize import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeRequest,
)
from mlctrio.protocol.validate import FieldError

T = TypeVar("T")

#: Built once at import, never mutated afterwards (hook registration is not thread-safe).
CONVERTER: Final = make_converter()

#: One encoder, reused: json.dumps with options builds a new JSONEncoder per call (~3 µs).
_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

_NO_UNSUPPORTED: Final[Mapping[str, tuple[Any, str]]] = {}


def parse_body(
    body: object,
    cls: type[T],
    unsupported: Mapping[str, tuple[Any, str]] = _NO_UNSUPPORTED,
    prepare: Callable[[dict[str, Any]], None] | None = None,
) -> T:
    """A decoded JSON body as `cls`: fields in `unsupported` are dropped when they hold an
    accepted value, else a 400 naming them; `prepare` may then rewrite the fields in place."""
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    fields = dict(body)
    for name, (accepts, why) in unsupported.items():
        if name in fields and not accepts(fields.pop(name)):
            raise InvalidRequestError(
                f"Unsupported parameter '{name}': {why}.", param=name, code="unsupported_parameter"
            )
    if prepare is not None:
        prepare(fields)
    try:
        return CONVERTER.structure(fields, cls)
    except FieldError as e:
        param = e.param
        where = f"Invalid '{param}'" if param else "Invalid request"
        raise InvalidRequestError(f"{where}: {e.message}.", param=param, code=e.code) from None


def parse_chat_request(body: object) -> ChatCompletionRequest:
    """Validate a POST /v1/chat/completions body."""
    return parse_body(body, ChatCompletionRequest, chat.UNSUPPORTED_FIELDS)


def parse_completion_request(body: object) -> CompletionRequest:
    """Validate a POST /v1/completions body."""
    return parse_body(body, CompletionRequest, completions.UNSUPPORTED_FIELDS)


def parse_embedding_request(body: object) -> EmbeddingRequest:
    """Validate a POST /v1/embeddings body."""
    return parse_body(body, EmbeddingRequest)


def parse_tokenize_request(body: object) -> TokenizeRequest:
    """Validate a POST /tokenize body: `{"prompt": ...}` or `{"messages": [...]}`."""
    if isinstance(body, dict) and "messages" in body:
        return parse_body(body, TokenizeChatRequest)
    return parse_body(body, TokenizeCompletionRequest)


def parse_detokenize_request(body: object) -> DetokenizeRequest:
    """Validate a POST /detokenize body."""
    return parse_body(body, DetokenizeRequest)


def to_json(response: object) -> dict[str, Any]:
    """A response value as the JSON object OpenAI would send (keys omitted where OpenAI omits)."""
    result = CONVERTER.unstructure(response)
    assert isinstance(result, dict)
    return result


def to_json_bytes(response: object) -> bytes:
    """`to_json` encoded compactly as UTF-8."""
    return _ENCODER.encode(to_json(response)).encode()
