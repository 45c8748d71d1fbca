"""Tool calling over HTTP with SmolLM2's real chat template, which ignores `tools` and
concatenates `message['content']` with strings.

The server runs the echo fake (tests/server/conftest.py) with SmolLM2's template and a grammar
compiled for the byte tokenizer: unconstrained, the echo returns the rendered prompt (the
template's stop ids are left out so it is echoed whole); constrained, the grammar masks the echo's
token, so the reply is a random walk through the grammar, and every one must be a complete call.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import httpx
import openai
import pytest

from mlctrio.runtime.chat_template import HFChatTemplate

from .conftest import ServerHandle
from .grammar_echo import grammar_echo_server

ENUM_TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"enum": ["Paris", "Rome"]}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "now", "description": "The time"}},
]  # fmt: skip
HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
]  # fmt: skip


@pytest.fixture(scope="module")
def smollm2_template_source(smollm2_gguf: Path) -> str:
    reader = gguf.GGUFReader(smollm2_gguf)
    source = reader.fields["tokenizer.chat_template"].contents()
    assert isinstance(source, str) and "message['content']" in source
    return source


@pytest.fixture(scope="module")
def smol_server(smollm2_template_source: str) -> Iterator[ServerHandle]:
    template = HFChatTemplate({"default": smollm2_template_source})  # no stop ids: echo it all

    with grammar_echo_server(
        template, model_id="smol", tool_call_format=template.call_format
    ) as handle:
        yield handle


def _chat(handle: ServerHandle, **body: Any) -> dict[str, Any]:
    with httpx.Client(base_url=handle.url, timeout=60) as http:
        response = http.post("/v1/chat/completions", json={"model": "mock://echo", **body})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_prompt_lists_the_tools_and_renders_tool_history(smol_server: ServerHandle) -> None:
    body = _chat(
        smol_server, messages=HISTORY, tools=ENUM_TOOLS, tool_choice="none",
        skip_special_tokens=False,
    )  # fmt: skip
    prompt = body["choices"][0]["message"]["content"]
    assert prompt.startswith(
        "<|im_start|>system\nYou can call any of the following tools to satisfy the user's "
        'requests: [\n  {\n    "type": "function",\n    "function": {\n      "name": "get_weather"'
    )
    assert '<tool_call>\n{"name": "tool_name", "arguments": {"arg1": "some_value"}}' in prompt
    assert prompt.endswith(
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris", "unit": "c"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>tool\n18C and sunny<|im_end|>\n<|im_start|>assistant\n"
    )


def test_required_and_named_tool_choice_always_end_in_a_complete_call(
    smol_server: ServerHandle,
) -> None:
    client = openai.OpenAI(base_url=smol_server.url + "/v1", api_key="x", max_retries=0)
    choices: list[Any] = ["required", {"type": "function", "function": {"name": "get_weather"}}]
    for seed in range(12):
        choice = choices[seed % 2]
        reply = client.chat.completions.create(
            model="mock://echo", messages=HISTORY[:1], tools=ENUM_TOOLS,  # type: ignore[arg-type]
            tool_choice=choice, seed=seed, max_tokens=300, parallel_tool_calls=False,
        )  # fmt: skip
        (out,) = reply.choices
        assert out.finish_reason == "tool_calls", (seed, out)
        assert out.message.content is None and out.message.tool_calls
        (call,) = out.message.tool_calls
        arguments = json.loads(call.function.arguments)
        if choice == "required" and call.function.name == "now":
            assert arguments == {}
        else:
            assert call.function.name == "get_weather"
            assert arguments["city"] in ("Paris", "Rome") and arguments["unit"] in ("c", "f")


def test_streamed_required_call(smol_server: ServerHandle) -> None:
    client = openai.OpenAI(base_url=smol_server.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="mock://echo", messages=HISTORY, tools=ENUM_TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        seed=3, max_tokens=300, stream=True,
    )  # fmt: skip
    names, arguments, finish = [], "", None
    for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            if delta_call.function and delta_call.function.name:
                names.append(delta_call.function.name)
            arguments += (delta_call.function.arguments or "") if delta_call.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert names == ["get_weather"] and finish == "tool_calls"
    assert set(json.loads(arguments)) == {"city", "unit"}


def test_ignore_eos_bans_eos_but_request_stop_ids_still_stop(smol_server: ServerHandle) -> None:
    # The echo puts all the mass on EOS once the prompt is echoed: banned with ignore_eos, the
    # reply runs to max_tokens where it would stop at once.
    hi = [{"role": "user", "content": "hi"}]
    plain = _chat(smol_server, messages=hi, max_tokens=200)
    assert plain["choices"][0]["finish_reason"] == "stop"
    used = plain["usage"]["completion_tokens"]
    body = _chat(smol_server, messages=hi, max_tokens=used + 5, ignore_eos=True, temperature=0)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == used + 5
    # <|im_start|> (257) is the prompt's first token: an explicit stop id still stops
    stopped = _chat(smol_server, messages=hi, ignore_eos=True, stop_token_ids=[257])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == 1
