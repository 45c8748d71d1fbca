"""Reasoning output on /v1/responses: a thinking model's think block as a `reasoning` output
item before the message (vLLM's shape: `reasoning_text` content), its stream events, and the
request side (reasoning items sent back, `reasoning.effort`). The server is the echo fake with a
thinking template (reasoning_echo.py): the input is the reply.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from .conftest import ServerHandle
from .reasoning_echo import CALL, MODEL, REPLY, WEATHER, openapi_check, thinking_echo_server
from .reasoning_echo import events as sse_events


@pytest.fixture(scope="module")
def thinking_server() -> Iterator[ServerHandle]:
    yield from thinking_echo_server()


def _client(handle: ServerHandle) -> openai.OpenAI:
    return openai.OpenAI(base_url=handle.url + "/v1", api_key="x", max_retries=0)


def test_responses_reasoning_item(thinking_server: ServerHandle) -> None:
    with _client(thinking_server) as client:
        reply = client.responses.create(model=MODEL, input=REPLY)
    thought, message = reply.output
    assert thought.type == "reasoning" and thought.id.startswith("rs_")
    assert thought.status == "completed" and thought.summary == []
    assert thought.content is not None
    assert [(c.type, c.text) for c in thought.content] == [
        ("reasoning_text", "\nThe user asks for a capital.\n")
    ]
    assert message.type == "message" and reply.output_text == "Paris."
    assert reply.usage is not None
    assert reply.usage.output_tokens_details.reasoning_tokens == len(
        "<think>\nThe user asks for a capital.\n</think>"
    )
    openapi_check(thinking_server, "/v1/responses", reply.to_dict(), stream=False)


def test_responses_streamed_reasoning_events(thinking_server: ServerHandle) -> None:
    with _client(thinking_server) as client:
        with client.responses.stream(model=MODEL, input=REPLY) as stream:
            events = list(stream)
            final = stream.get_final_response()
    types = [e.type for e in events]
    squeezed = [t for k, t in enumerate(types) if not (k and t == types[k - 1] and "delta" in t)]
    assert squeezed == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.completed",
    ]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    (done,) = [e for e in events if e.type == "response.reasoning_text.done"]
    assert deltas == done.text == "\nThe user asks for a capital.\n"
    assert {e.output_index for e in events if "reasoning_text" in e.type} == {0}
    assert final.output[0].type == "reasoning" and final.output_text == "Paris."
    raw = sse_events(thinking_server, "/v1/responses", {"input": REPLY})
    for event in raw:
        openapi_check(thinking_server, "/v1/responses", event, stream=True)


def test_responses_reasoning_then_function_call(thinking_server: ServerHandle) -> None:
    tool: Any = {"type": "function", **WEATHER["function"]}
    text = "<think>Look it up.</think>\n" + CALL
    with _client(thinking_server) as client:
        reply = client.responses.create(model=MODEL, input=text, tools=[tool])
        with client.responses.stream(model=MODEL, input=text, tools=[tool]) as stream:
            streamed = stream.get_final_response()
    for response in (reply, streamed):
        thought, call = response.output
        assert thought.type == "reasoning" and thought.content is not None
        assert thought.content[0].text == "Look it up."
        assert call.type == "function_call" and call.name == "get_weather"
        assert json.loads(call.arguments) == {"city": "Rome", "unit": "f"}


def test_responses_reasoning_round_trip_and_effort(thinking_server: ServerHandle) -> None:
    """A reasoning item sent back is the next assistant message's reasoning_content, and
    reasoning.effort reaches the template as reasoning_effort (the echo shows both)."""
    turn: Any = [
        {"role": "user", "content": "Q1 "},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "R1"}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "A1 ", "annotations": []}]},
        {"role": "user", "content": "Q2"},
    ]  # fmt: skip
    with _client(thinking_server) as client:
        reply = client.responses.create(
            model=MODEL, input=turn, reasoning={"effort": "high", "summary": "auto"}
        )
    assert reply.output_text == "[effort=high]Q1 <think>R1</think>A1 Q2"
    assert reply.reasoning is not None and reply.reasoning.effort == "high"
