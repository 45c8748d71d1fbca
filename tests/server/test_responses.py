"""POST /v1/responses through the official SDK: `client.responses.create`, `.stream` and `.parse`.

Plain text runs on the shared mock://echo server (the reply echoes the rendered prompt: the
message texts joined by "\\n"). Tools and json_schema run on the echo fake with a grammar compiled
for its byte tokenizer (as in test_tools_template.py): unconstrained, the echo of a prompt that
spells a tool call *is* a tool call; constrained, the grammar masks the echo, so the reply is a
random walk through the grammar, which for enum-only schemas always ends complete.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest
from openai.types.responses import ResponseOutputMessage

from mlctrio.testing.echo import RawChatTemplate

from .conftest import ServerHandle
from .grammar_echo import grammar_echo_server

MODEL = "mock://echo"
WEATHER: Any = {
    "type": "function", "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Rome"]}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False},
    "strict": True,
}  # fmt: skip
NOW: Any = {"type": "function", "name": "now", "description": "The time", "parameters": None}
CALL_TEXT = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "f"}}\n</tool_call>'
)
TEXT_EVENTS = [
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def _client(handle: ServerHandle) -> openai.OpenAI:
    return openai.OpenAI(base_url=handle.url + "/v1", api_key="x", max_retries=0)


@pytest.fixture
def client(server: ServerHandle) -> Iterator[openai.OpenAI]:
    with _client(server) as sdk:
        yield sdk


@pytest.fixture
def tool_client(grammar_server: ServerHandle) -> Iterator[openai.OpenAI]:
    with _client(grammar_server) as sdk:
        yield sdk


def _squeeze(types: Sequence[str]) -> list[str]:
    """Event types with runs of the same delta type collapsed to one."""
    return [t for k, t in enumerate(types) if not (k and t == types[k - 1] and "delta" in t)]


# --- plain text on mock://echo --------------------------------------------------------------


def test_string_input(client: openai.OpenAI) -> None:
    reply = client.responses.create(model=MODEL, input="Hello, Responses!")
    assert reply.object == "response" and reply.id.startswith("resp_")
    assert reply.status == "completed" and reply.error is None
    assert reply.output_text == "Hello, Responses!"
    (item,) = reply.output
    assert isinstance(item, ResponseOutputMessage)
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert item.id.startswith("msg_") and item.content[0].type == "output_text"
    usage = reply.usage
    assert usage is not None and usage.input_tokens == len("Hello, Responses!")
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens >= len("Hello, Responses!")
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert reply.model == MODEL and reply.to_dict()["store"] is False and reply.tools == []


def test_message_items_and_instructions(client: openai.OpenAI) -> None:
    items: Any = [
        {"role": "user", "content": "first"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "reply", "annotations": []}],
        },
        {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": "dev"}],
        },
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "sec"},
                {"type": "input_text", "text": "ond"},
            ],
        },
    ]
    reply = client.responses.create(
        model=MODEL,
        instructions="Be brief.",
        input=items,
        temperature=0.2,
        top_p=0.5,
        metadata={"k": "v"},
    )
    assert reply.output_text == "Be brief.\nfirst\nreply\ndev\nsecond"
    assert reply.instructions == "Be brief."
    assert (reply.temperature, reply.top_p, reply.metadata) == (0.2, 0.5, {"k": "v"})


def test_max_output_tokens_makes_it_incomplete(client: openai.OpenAI) -> None:
    reply = client.responses.create(model=MODEL, input="abcdefghijklmnop", max_output_tokens=5)
    assert reply.status == "incomplete"
    assert reply.incomplete_details is not None
    assert reply.incomplete_details.reason == "max_output_tokens"
    assert reply.output_text == "abcde" and reply.output[0].to_dict()["status"] == "incomplete"
    assert reply.usage is not None and reply.usage.output_tokens == 5


def test_streamed_event_order(client: openai.OpenAI) -> None:
    text = "Stream me, please."
    with client.responses.stream(model=MODEL, input=text) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert _squeeze(types) == [
        "response.created", "response.in_progress", *TEXT_EVENTS, "response.completed",
    ]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == text and len(deltas) > 1
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == text
    assert final.output_text == text and final.status == "completed"
    assert final.id == events[0].response.id  # type: ignore[union-attr]
    assert final.usage is not None and final.usage.input_tokens == len(text)


def test_raw_stream_ends_with_completed_and_no_done_marker(server: ServerHandle) -> None:
    body = {"model": MODEL, "input": "raw", "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/responses", json=body) as reply:
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith("text/event-stream")
            blocks = [b for b in reply.read().decode().split("\n\n") if b]
    names = [b.split("\n")[0].removeprefix("event: ") for b in blocks]
    datas = [json.loads(b.split("\n")[1].removeprefix("data: ")) for b in blocks]
    assert names == [d["type"] for d in datas]
    assert names[-1] == "response.completed"
    assert datas[-1]["response"]["output"][0]["content"][0]["text"] == "raw"


def test_streamed_incomplete(client: openai.OpenAI) -> None:
    stream = client.responses.create(
        model=MODEL, input="abcdefgh", max_output_tokens=3, stream=True
    )
    events = list(stream)
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.status == "incomplete"
    assert last.response.output_text == "abc"
    item_done = next(e for e in events if e.type == "response.output_item.done")
    assert item_done.item.status == "incomplete"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id", "unsupported_parameter"),
        ({"store": True}, "store", "unsupported_parameter"),
        ({"background": True}, "background", "unsupported_parameter"),
        ({"temprature": 1}, "temprature", "unknown_parameter"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type", None),
        (
            {"input": [{"type": "function_call_output", "call_id": "c1", "output": "x"}]},
            "input.0.call_id",
            None,
        ),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input.0.type", None),
        ({"tool_choice": "required"}, "tool_choice", None),
        ({"tools": [WEATHER]}, "tools", None),  # mock://echo compiles no grammar
        ({"text": {"format": {"type": "json_object"}}}, "text.format", None),
        ({"max_output_tokens": 0}, "max_output_tokens", None),
        ({"max_output_tokens": 10**6}, "max_output_tokens", "context_length_exceeded"),
    ],
)
def test_bad_requests_get_errors_in_the_openai_shape(
    client: openai.OpenAI, extra: dict[str, Any], param: str, code: str | None
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input="x", extra_body=extra)
    error = info.value.body
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert error["code"] == code if code else error["message"]
    if param == "previous_response_id":
        assert "stateless" in error["message"]


def test_engine_failure_ends_the_stream_with_response_failed(
    server_factory: Callable[..., ServerHandle],
) -> None:
    handle = server_factory(model="mock://echo?delay_ms=20", request_timeout_s=0.3)
    with _client(handle) as client:
        stream = client.responses.create(model=MODEL, input="z" * 400, stream=True)
        events = list(stream)  # ends cleanly: no exception, no [DONE] needed
    assert events[0].type == "response.created"
    last = events[-1]
    assert last.type == "response.failed"
    assert last.response.status == "failed" and last.response.error is not None
    assert last.response.error.code == "server_error"
    assert "timeout" in last.response.error.message
    assert [e.sequence_number for e in events] == list(range(len(events)))
    handle.wait_quiescent()


# --- tools and json_schema on the grammar echo ------------------------------------------------


@pytest.fixture(scope="module")
def grammar_server() -> Iterator[ServerHandle]:
    with grammar_echo_server(
        RawChatTemplate(),
        model_id=MODEL,
        tool_call_format="hermes",
        context_window=4096,
        total_pages=1024,
    ) as handle:
        yield handle


def test_function_call_round_trip(tool_client: openai.OpenAI) -> None:
    """A Codex-style loop: the call comes back as a function_call item, is sent back with its
    output, and the next turn sees both (the echo shows the tool's output in its reply)."""
    client = tool_client
    first = client.responses.create(model=MODEL, input=CALL_TEXT, tools=[WEATHER, NOW])
    assert first.status == "completed"
    (call,) = first.output
    assert call.type == "function_call" and call.status == "completed"
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    assert call.id is not None and call.id.startswith("fc_")
    assert json.loads(call.arguments) == {"city": "Rome", "unit": "f"}
    turn: Any = [
        {"role": "user", "content": "Weather in Rome?"},
        *first.output,  # the SDK's own objects, sent back as they came
        {"type": "function_call_output", "call_id": call.call_id, "output": "18F, sunny"},
    ]
    second = client.responses.create(  # with the fields Codex sends, stateless
        model=MODEL,
        tools=[WEATHER, NOW],
        tool_choice="auto",
        parallel_tool_calls=False,
        store=False,
        include=["reasoning.encrypted_content"],
        prompt_cache_key="session-1",
        input=turn,
    )
    assert second.output_text == "Weather in Rome?\n\n18F, sunny"
    assert [item.type for item in second.output] == ["message"]
    assert second.parallel_tool_calls is False and second.tool_choice == "auto"
    assert [t.to_dict().get("name") for t in second.tools] == ["get_weather", "now"]


def test_streamed_function_call(tool_client: openai.OpenAI) -> None:
    tools: Any = [WEATHER]
    with tool_client.responses.stream(
        model=MODEL, input="Sure.\n" + CALL_TEXT, tools=tools
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert _squeeze([e.type for e in events]) == [
        "response.created", "response.in_progress", *TEXT_EVENTS,
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    message, call = final.output
    assert message.type == "message" and final.output_text == "Sure."
    assert call.type == "function_call" and call.name == "get_weather"
    arguments = "".join(
        e.delta for e in events if e.type == "response.function_call_arguments.delta"
    )
    assert json.loads(arguments) == json.loads(call.arguments) == {"city": "Rome", "unit": "f"}
    assert call.parsed_arguments == {"city": "Rome", "unit": "f"}  # the SDK's own parse (strict)


def test_named_tool_choice_always_ends_in_a_complete_call(tool_client: openai.OpenAI) -> None:
    client = tool_client
    for _ in range(4):
        reply = client.responses.create(
            model=MODEL, input="anything", tools=[WEATHER, NOW], max_output_tokens=1000,
            tool_choice={"type": "function", "name": "get_weather"},
        )  # fmt: skip
        assert reply.status == "completed"
        (call,) = reply.output
        assert call.type == "function_call" and call.name == "get_weather"
        arguments = json.loads(call.arguments)
        assert arguments["city"] in ("Paris", "Rome") and arguments["unit"] in ("c", "f")


class Forecast(pydantic.BaseModel):
    city: Literal["Paris", "Rome"]
    sky: Literal["sunny", "rainy"]


def test_json_schema_text_format(tool_client: openai.OpenAI) -> None:
    client = tool_client
    for _ in range(3):
        reply = client.responses.parse(
            model=MODEL, input="forecast", text_format=Forecast, max_output_tokens=1000
        )
        assert reply.status == "completed"
        assert isinstance(reply.output_parsed, Forecast)
        assert reply.text is not None and reply.text.format is not None
        assert reply.text.format.type == "json_schema"
    with client.responses.stream(
        model=MODEL, input="forecast", text_format=Forecast, max_output_tokens=1000
    ) as stream:
        final = stream.get_final_response()
    assert isinstance(final.output_parsed, Forecast)


def test_openapi_describes_the_real_response(server: ServerHandle) -> None:
    with server.client() as http:
        doc = http.get("/openapi.json").json()
        reply = http.post("/v1/responses", json={"model": MODEL, "input": "doc", "user": "u"})
        error = http.post("/v1/responses", json={"model": MODEL})
        with http.stream(
            "POST", "/v1/responses", json={"model": MODEL, "input": "doc", "stream": True}
        ) as stream:
            events = [
                json.loads(line.removeprefix("data: "))
                for line in stream.iter_lines()
                if line.startswith("data: ")
            ]
    operation = doc["paths"]["/v1/responses"]["post"]
    components = {"components": doc["components"]}

    def check(status: str, instance: object, media: str = "application/json") -> None:
        content = operation["responses"][status]["content"][media]
        schema = content["x-sse-data"] if media == "text/event-stream" else content["schema"]
        jsonschema.validate(instance, {**schema, **components})

    assert reply.status_code == 200 and error.status_code == 400
    check("200", reply.json())
    check("400", error.json())
    assert error.json()["error"]["param"] == "input"
    for event in events:
        check("200", event, "text/event-stream")
    assert {"response.created", "response.completed"} <= {e["type"] for e in events}
