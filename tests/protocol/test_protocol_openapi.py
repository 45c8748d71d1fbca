"""The OpenAPI 3.1 document: routes, error responses, streaming, and well-formed schemas."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from mlctrio.protocol.openai import parse_chat_request, parse_completion_request
from mlctrio.protocol.openapi import ALL_ROUTES, openapi_document

DOCUMENT = openapi_document()
SCHEMAS = DOCUMENT["components"]["schemas"]


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def test_every_route_is_described() -> None:
    operations = {
        f"{method.upper()} {path}" for path, item in DOCUMENT["paths"].items() for method in item
    }
    assert operations == set(ALL_ROUTES)
    assert DOCUMENT["openapi"] == "3.1.0"
    json.dumps(DOCUMENT)  # plain JSON, nothing else


def test_refs_resolve_and_schemas_are_valid() -> None:
    refs = _refs(DOCUMENT)
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in SCHEMAS, ref
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_generation_routes_stream_as_sse() -> None:
    for path, chunk in (
        ("/v1/chat/completions", "ChatCompletionChunk"),
        ("/v1/completions", "CompletionChunk"),
    ):
        content = DOCUMENT["paths"][path]["post"]["responses"]["200"]["content"]
        assert content["text/event-stream"]["x-sse-data"] == {
            "$ref": f"#/components/schemas/{chunk}"
        }
        assert "application/json" in content


@pytest.mark.parametrize(
    ("path", "method", "codes"),
    [
        ("/v1/chat/completions", "post", {"400", "404", "413", "503"}),
        ("/v1/completions", "post", {"400", "404", "413", "503"}),
        ("/tokenize", "post", {"400", "404", "413", "503"}),
        ("/v1/models/{model}", "get", {"404", "503"}),
        ("/v1/models", "get", {"503"}),
    ],
)
def test_error_responses_use_the_envelope(path: str, method: str, codes: set[str]) -> None:
    responses = DOCUMENT["paths"][path][method]["responses"]
    assert set(responses) - {"200"} == codes
    for code in codes:
        assert responses[code]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }
    error = SCHEMAS["ErrorDetail"]
    assert error["required"] == ["message", "type", "param", "code"]


def test_field_constraints_and_literals_are_published() -> None:
    chat = SCHEMAS["ChatCompletionRequest"]
    assert chat["required"] == ["model", "messages"]
    assert chat["additionalProperties"] is False
    props = chat["properties"]
    assert (props["temperature"]["minimum"], props["temperature"]["maximum"]) == (0, 2)
    assert props["top_p"]["exclusiveMinimum"] == 0
    assert props["messages"]["minItems"] == 1
    assert props["top_logprobs"]["maximum"] == 20
    assert "Only the default" in props["store"]["description"]
    assert {"$ref": "#/components/schemas/UserMessage"} in props["messages"]["items"]["anyOf"]
    assert SCHEMAS["UserMessage"]["properties"]["role"] == {"const": "user"}
    assert SCHEMAS["ChatCompletionChunk"]["properties"]["object"]["const"] == (
        "chat.completion.chunk"
    )
    assert SCHEMAS["CompletionRequest"]["properties"]["logprobs"]["maximum"] == 5
    # output: keys always sent are required even when null; OMIT keys are not
    message = SCHEMAS["ChatCompletionMessage"]
    assert set(message["required"]) == {"role", "content", "refusal"}
    assert "usage" not in SCHEMAS["ChatCompletionChunk"]["required"]
    assert "usage" in SCHEMAS["ChatCompletion"]["required"]


def test_tool_call_is_shared_between_request_and_response() -> None:
    assert "ToolCall" in SCHEMAS and "ToolCallOutput" not in SCHEMAS


def test_route_subset_and_auth() -> None:
    doc = openapi_document(
        ["GET /health", "POST /v1/chat/completions"],
        api_key_required=True,
        title="t",
        version="9",
        extra_paths={"/debug/dump": {"get": {"responses": {}}}},
    )
    assert set(doc["paths"]) == {"/health", "/v1/chat/completions", "/debug/dump"}
    assert doc["info"] == {"title": "t", "version": "9"}
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert "401" in chat["responses"] and chat["security"] == [{"bearer": []}]
    assert "401" not in doc["paths"]["/health"]["get"]["responses"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "ModelList" not in doc["components"]["schemas"]  # only what the routes use
    with pytest.raises(ValueError, match="unknown route"):
        openapi_document(["GET /nope"])


def test_document_is_deterministic() -> None:
    assert openapi_document() == DOCUMENT


@pytest.mark.parametrize(
    ("component", "parse", "body"),
    [
        (
            "ChatCompletionRequest",
            parse_chat_request,
            {
                "model": "m",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
                "stop": "s",
                "logit_bias": {"1": 2},
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "object"}},
                    }
                ],
                "tool_choice": {"type": "function", "function": {"name": "f"}},
                "response_format": {"type": "json_schema", "json_schema": {"name": "n"}},
                "stream": True,
                "stream_options": {"include_usage": True},
                "top_k": -1,
                "store": False,
            },
        ),
        (
            "CompletionRequest",
            parse_completion_request,
            {"model": "m", "prompt": [[1, 2], [3]], "logprobs": 0, "echo": True},
        ),
    ],
)
def test_good_bodies_match_the_request_schema(component: str, parse: Any, body: Any) -> None:
    parse(body)
    schema = {"$ref": f"#/components/schemas/{component}", "components": DOCUMENT["components"]}
    jsonschema.Draft202012Validator(schema).validate(body)
