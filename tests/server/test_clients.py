"""Clients people use: the SDK's streaming helpers and LangChain, against the demo model."""

from __future__ import annotations

import json
import warnings

import openai
import pydantic
import pytest

from .conftest import ServerHandle
from .test_structured_output import TOOLS

MODEL = "demo://tiny"


@pytest.fixture
def bias(closing_bias: dict[str, int]) -> dict[str, int]:
    return closing_bias


def test_sdk_stream_helper_accumulates_tool_calls(
    demo_server: ServerHandle, bias: dict[str, int]
) -> None:
    client = openai.OpenAI(base_url=demo_server.url + "/v1", api_key="x", max_retries=0)
    stream_helper = getattr(client.chat.completions, "stream", None) or (
        client.beta.chat.completions.stream
    )
    with stream_helper(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 2 + 3?"}],
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        seed=11,
        max_tokens=600,
        logit_bias=bias,
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls and final.choices[0].finish_reason == "tool_calls"
    for call in calls:
        assert call.function.name in {"get_weather", "add"}
        assert isinstance(json.loads(call.function.arguments), dict)


def test_tool_history_renders_through_the_template(demo_server: ServerHandle) -> None:
    client = openai.OpenAI(base_url=demo_server.url + "/v1", api_key="x", max_retries=0)
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Add 2 and 3"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=5,  # type: ignore[arg-type]
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert not reply.choices[0].message.tool_calls
    # The rendered prompt holds the call and its result (what the template received).
    import httpx

    tokens = httpx.post(
        demo_server.url + "/tokenize", json={"model": MODEL, "messages": messages}
    ).json()["tokens"]
    text = httpx.post(demo_server.url + "/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert '"a": 2' in text and "5" in text and "add" in text


def test_langchain_bind_tools_and_structured_output(
    demo_server: ServerHandle, bias: dict[str, int]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # third-party import-time deprecations
        from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=MODEL,
        base_url=demo_server.url + "/v1",
        api_key="x",  # type: ignore[arg-type]
        max_retries=0,
        max_completion_tokens=600,
        seed=5,
        logit_bias=bias,  # type: ignore[arg-type]
    )

    class Add(pydantic.BaseModel):
        """Add two integers."""

        a: int
        b: int

    tool_llm = llm.bind_tools([Add], tool_choice="Add")
    message = tool_llm.invoke("What is 2 + 3?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "Add"
    assert set(message.tool_calls[0]["args"]) == {"a", "b"}

    class Thing(pydantic.BaseModel):
        size: str
        count: int

    structured = llm.with_structured_output(Thing, method="json_schema")
    thing = structured.invoke("Describe a thing.")
    assert isinstance(thing, Thing)
    via_tools = llm.with_structured_output(Thing, method="function_calling")
    assert isinstance(via_tools.invoke("Describe a thing."), Thing)
