"""response_format and tool calling against the real engine and the demo model (random weights).

The grammar guarantees the *shape*; whether a random model ever *finishes* a JSON document is a
property of the model (a random walk through nested objects may go on forever). So these tests
pass a mild `logit_bias` (an ordinary OpenAI parameter) that favours closing tokens: it shows
the grammar mask composing with the bias, and every one of the 100 seeded outputs per kind must
end by itself, parse and validate.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest

from .conftest import ServerHandle

MODEL = "demo://tiny"
NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "size": {"type": "string", "enum": ["small", "medium", "large"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "admin": {"type": "boolean"}},
            "required": ["id", "admin"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "size", "owner"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 16},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]


@pytest.fixture
def client(demo_server: ServerHandle) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo_server.url + "/v1", api_key="x", max_retries=0)


def _ask(client: openai.OpenAI, seed: int, bias: dict[str, int], **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Request {seed}: answer in JSON."}],
        seed=seed,
        temperature=1.0,
        max_tokens=600,
        logit_bias=bias,
        **kwargs,
    )


def test_json_object_100_seeds(client: openai.OpenAI, closing_bias: dict[str, int]) -> None:
    outputs = []
    for seed in range(100):
        reply = _ask(client, seed, closing_bias, response_format={"type": "json_object"})
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (seed, choice.message.content)
        value = json.loads(choice.message.content or "")
        assert isinstance(value, dict)
        outputs.append(choice.message.content)
    assert len(set(outputs)) > 20  # the seeds really sample different documents


def test_nested_json_schema_100_seeds(client: openai.OpenAI, closing_bias: dict[str, int]) -> None:
    sizes = set()
    for seed in range(100):
        reply = _ask(
            client,
            seed,
            closing_bias,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "thing", "schema": NESTED_SCHEMA, "strict": True},
            },
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (seed, choice.message.content)
        value = json.loads(choice.message.content or "")
        jsonschema.validate(value, NESTED_SCHEMA)
        sizes.add(value["size"])
    assert len(sizes) > 1


def test_tool_choice_required_100_seeds(
    client: openai.OpenAI, closing_bias: dict[str, int]
) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    called = set()
    for seed in range(100):
        reply = _ask(client, seed, closing_bias, tools=TOOLS, tool_choice="required")
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", (seed, choice.message)
        calls = choice.message.tool_calls
        assert calls, seed
        for call in calls:
            assert call.id.startswith("call_") and call.type == "function"
            arguments = json.loads(call.function.arguments)
            jsonschema.validate(arguments, schemas[call.function.name])
            called.add(call.function.name)
    assert called == set(schemas)


def test_named_tool_choice_and_streamed_tool_calls(
    client: openai.OpenAI, closing_bias: dict[str, int]
) -> None:
    stream = _ask(
        client,
        7,
        closing_bias,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}},
        stream=True,
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    first_call = next(d.tool_calls[0] for d in deltas if d.tool_calls)
    assert first_call.id and first_call.function.name == "add" and first_call.index == 0
    arguments = "".join(
        (tc.function.arguments or "") for d in deltas for tc in (d.tool_calls or ())
    )
    assert set(json.loads(arguments)) == {"a", "b"}
    assert not any(d.content for d in deltas)  # content and tool calls never mixed up
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_sdk_parse_with_pydantic_model(client: openai.OpenAI, closing_bias: dict[str, int]) -> None:
    class Owner(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        id: int
        admin: bool

    class Thing(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        size: str
        owner: Owner

    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    completion = parse(
        model=MODEL,
        messages=[{"role": "user", "content": "A thing, please."}],
        response_format=Thing,
        seed=3,
        max_tokens=600,
        logit_bias=closing_bias,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Thing) and isinstance(parsed.owner.admin, bool)


def test_bad_schema_is_400_before_any_stream(demo_server: ServerHandle) -> None:
    with httpx.Client(base_url=demo_server.url) as http:
        response = http.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "stream": True,
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}},
                },
            },
        )
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["param"] == "response_format"
