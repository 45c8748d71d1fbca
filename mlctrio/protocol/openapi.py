"""The OpenAPI 3.1 document of mlctrio's HTTP surface, generated from the protocol classes.

`openapi_document()` is pure: the server passes the routes it actually serves (and any extra
paths of its own, e.g. debug routes) and publishes the result, typically at /openapi.json.
Streaming responses are `text/event-stream`; OpenAPI 3.1 cannot type the events, so the schema of
each `data:` payload is given under the media type's `x-sse-data` extension.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from mlctrio.protocol import chat, completions, responses, sglang
from mlctrio.protocol.chat import ChatCompletionRequest
from mlctrio.protocol.chat_output import ChatCompletion, ChatCompletionChunk
from mlctrio.protocol.common import ErrorResponse, Model, ModelList
from mlctrio.protocol.completions import Completion, CompletionChunk, CompletionRequest
from mlctrio.protocol.embeddings import EmbeddingRequest
from mlctrio.protocol.responses_output import STREAM_EVENT_SCHEMA, ResponseObject
from mlctrio.protocol.schema import SchemaBuilder
from mlctrio.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)

#: Every route this module can describe, as "METHOD /path".
ALL_ROUTES: Final = (
    "GET /v1/models",
    "GET /v1/models/{model}",
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/responses",
    "POST /v1/embeddings",
    "POST /tokenize",
    "POST /detokenize",
    "GET /health",
    "GET /metrics",
)

_EMBEDDINGS: Final = {
    "type": "object",
    "required": ["object", "data", "model", "usage"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["object", "index", "embedding"],
                "properties": {
                    "object": {"const": "embedding"},
                    "index": {"type": "integer"},
                    "embedding": {
                        "oneOf": [
                            {"type": "array", "items": {"type": "number"}},
                            {"type": "string", "description": "base64 of float32 LE bytes"},
                        ]
                    },
                },
            },
        },
        "model": {"type": "string"},
        "usage": {
            "type": "object",
            "required": ["prompt_tokens", "total_tokens"],
            "properties": {
                "prompt_tokens": {"type": "integer"},
                "total_tokens": {"type": "integer"},
            },
        },
    },
}

_ERROR_TEXT: Final = {
    "400": "Invalid request (the error's `param` names the offending field)",
    "401": "Missing or wrong API key",
    "404": "Unknown model",
    "413": "Request body or prompt too large",
    "503": "Server overloaded or not ready (may carry Retry-After)",
}

_SSE_TEXT: Final = (
    "Server-sent events: one `data: <JSON>` event per chunk (schema in `x-sse-data`), "
    "ending with `data: [DONE]`. An error after the stream began arrives as "
    '`data: {"error": ...}` (ErrorResponse).'
)

_RESPONSES_SSE_TEXT: Final = (
    "Server-sent events: `event: <type>` and `data: <JSON>` per event, in OpenAI's order "
    "(response.created ... response.completed, .incomplete or .failed), no `[DONE]`."
)


def _json(ref: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": ref}}


def _errors(builder: SchemaBuilder, codes: Iterable[str]) -> dict[str, Any]:
    ref = builder.ref(ErrorResponse, "output")
    return {code: {"description": _ERROR_TEXT[code], "content": _json(ref)} for code in codes}


def _generation(
    builder: SchemaBuilder,
    summary: str,
    request: type,
    response: type,
    chunk: type,
    unsupported: Mapping[str, tuple[Any, str]],
) -> dict[str, Any]:
    name = builder.ref(request, "input")["$ref"].rsplit("/", 1)[-1]
    component = builder.components[name]
    for field, (_, why) in unsupported.items():  # accepted with their default values only
        description = sglang.DESCRIPTIONS.get(field, f"Only the default: {why}.")
        component["properties"].setdefault(field, {"description": description})
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": _json(builder.ref(request, "input"))},
        "responses": {
            "200": {
                "description": "The completion, or a stream of chunks when `stream` is true",
                "content": {
                    **_json(builder.ref(response, "output")),
                    "text/event-stream": {
                        "schema": {"type": "string", "description": _SSE_TEXT},
                        "x-sse-data": builder.ref(chunk, "output"),
                    },
                },
            },
        },
    }


def _operation(builder: SchemaBuilder, route: str) -> dict[str, Any]:
    if route == "GET /v1/models":
        return {
            "summary": "List the served models",
            "responses": {
                "200": {
                    "description": "The models",
                    "content": _json(builder.ref(ModelList, "output")),
                }
            },
        }
    if route == "GET /v1/models/{model}":
        return {
            "summary": "Describe one model",
            "parameters": [
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": {"description": "The model", "content": _json(builder.ref(Model, "output"))}
            },
        }
    if route == "POST /v1/chat/completions":
        return _generation(
            builder,
            "Create a chat completion",
            ChatCompletionRequest,
            ChatCompletion,
            ChatCompletionChunk,
            chat.UNSUPPORTED_FIELDS,
        )
    if route == "POST /v1/completions":
        return _generation(
            builder,
            "Create a text completion",
            CompletionRequest,
            Completion,
            CompletionChunk,
            completions.UNSUPPORTED_FIELDS,
        )
    if route == "POST /v1/responses":
        operation = _generation(
            builder,
            "Create a model response (stateless: store false, no previous_response_id)",
            responses.ResponsesRequest,
            ResponseObject,
            ResponseObject,
            responses.UNSUPPORTED_FIELDS,
        )
        stream = operation["responses"]["200"]["content"]["text/event-stream"]
        stream["schema"]["description"] = _RESPONSES_SSE_TEXT
        stream["x-sse-data"] = STREAM_EVENT_SCHEMA
        return operation
    if route == "POST /v1/embeddings":
        return _json_post(
            "Create embeddings (the model's final hidden states, pooled)",
            builder.ref(EmbeddingRequest, "input"),
            "One vector per input",
            _EMBEDDINGS,
        )
    if route == "POST /tokenize":
        body = {
            "oneOf": [
                builder.ref(TokenizeCompletionRequest, "input"),
                builder.ref(TokenizeChatRequest, "input"),
            ]
        }
        return _json_post(
            "Tokenize a prompt or chat messages (after the chat template)",
            body,
            "Token ids",
            builder.ref(TokenizeResponse, "output"),
        )
    if route == "POST /detokenize":
        return _json_post(
            "Turn token ids back into text",
            builder.ref(DetokenizeRequest, "input"),
            "The text",
            builder.ref(DetokenizeResponse, "output"),
        )
    if route == "GET /health":
        return {
            "summary": "Liveness and readiness",
            "responses": {"200": {"description": "Ready (empty body)"}},
        }
    if route == "GET /metrics":
        return {
            "summary": "Prometheus metrics",
            "responses": {
                "200": {
                    "description": "Prometheus text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    raise ValueError(f"unknown route {route!r}; known: {', '.join(ALL_ROUTES)}")


def _json_post(summary: str, body: Any, answer: str, answer_schema: Any) -> dict[str, Any]:
    """A POST operation taking and answering JSON."""
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": _json(body)},
        "responses": {"200": {"description": answer, "content": _json(answer_schema)}},
    }


def _error_codes(route: str, api_key_required: bool) -> list[str]:
    method, path = route.split(" ", 1)
    codes = ["400", "413"] if method == "POST" else []
    if api_key_required and path.startswith("/v1/"):
        codes.append("401")
    if path.startswith("/v1/models/") or method == "POST":
        codes.append("404")
    if path != "/metrics":
        codes.append("503")
    return sorted(codes)


def openapi_document(
    served_routes: Iterable[str] = ALL_ROUTES,
    *,
    title: str = "mlctrio",
    version: str = "0.1.0",
    api_key_required: bool = False,
    extra_paths: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Build the OpenAPI 3.1 document for `served_routes` (each one of ALL_ROUTES).

    `api_key_required` adds bearer authentication and 401 responses to the /v1/ routes;
    `extra_paths` (OpenAPI path items) are copied in as given, e.g. for debug routes.
    Raises ValueError for a route this module does not know.
    """
    builder = SchemaBuilder()
    paths: dict[str, dict[str, Any]] = {}
    for route in served_routes:
        operation = _operation(builder, route)
        codes = _error_codes(route, api_key_required)
        operation["responses"].update(_errors(builder, codes))
        method, path = route.split(" ", 1)
        if api_key_required and path.startswith("/v1/"):
            operation["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[method.lower()] = operation
    for path, item in (extra_paths or {}).items():
        paths.setdefault(path, {}).update(item)
    components: dict[str, Any] = {"schemas": dict(sorted(builder.components.items()))}
    if api_key_required:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": components,
    }
