"""Reasoning output on chat completions (server/reasoning.py): a thinking model's `<think>`
block in `reasoning_content`, streamed and whole, and the `--reasoning-parser` configuration.
The server is the echo fake with a thinking template (reasoning_echo.py): the user's message is
the reply.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from mlctrio.app import config_from_env
from mlctrio.cli import build_parser, config_from_args
from mlctrio.errors import ConfigError

from .conftest import ServerHandle
from .reasoning_echo import (
    CALL,
    MODEL,
    REPLY,
    THINKING,
    WEATHER,
    chat,
    joined,
    openapi_check,
    post,
    streamed_chat,
    thinking_echo_server,
)


@pytest.fixture(scope="module")
def thinking_server() -> Iterator[ServerHandle]:
    yield from thinking_echo_server()


@pytest.fixture(scope="module")
def raw_server() -> Iterator[ServerHandle]:
    yield from thinking_echo_server(reasoning_parser="none")


# --- chat completions -------------------------------------------------------------------------


def test_whole_reply_is_split(thinking_server: ServerHandle) -> None:
    body = chat(thinking_server, REPLY)
    (choice,) = body["choices"]
    message = choice["message"]
    assert message["reasoning_content"] == "\nThe user asks for a capital.\n"
    assert message["content"] == "Paris."  # the newlines after </think> dropped
    assert choice["finish_reason"] == "stop"
    reasoning_tokens = len("<think>\nThe user asks for a capital.\n</think>")  # a byte a token
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": reasoning_tokens}
    assert body["usage"]["completion_tokens"] > reasoning_tokens
    openapi_check(thinking_server, "/v1/chat/completions", body, stream=False)


@pytest.mark.parametrize(
    ("text", "extra"),
    [
        (REPLY, {}),
        ("Planning: </thi</think>\n \nIt is <think>Paris</think>.", THINKING),
        ("  <think></think>x", {}),
        ("<think>never closed <", {}),
        ("plain <think> answer", {}),
        ("abc</think>", THINKING),
    ],
)
def test_streamed_deltas_add_up_to_the_whole_reply(
    thinking_server: ServerHandle, text: str, extra: dict[str, Any]
) -> None:
    whole = chat(thinking_server, text, **extra)
    chunks = streamed_chat(thinking_server, text, stream_options={"include_usage": True}, **extra)
    message = whole["choices"][0]["message"]
    assert joined(chunks, "reasoning_content") == (message.get("reasoning_content") or None)
    assert (joined(chunks, "content") or None) == (message["content"] or None)
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        delta = choice["delta"]
        assert not ("reasoning_content" in delta and delta.get("content")), delta  # never mixed
        assert "</think>" not in delta.get("reasoning_content", "")
        openai.types.chat.ChatCompletionChunk.model_validate(chunk)
        openapi_check(thinking_server, "/v1/chat/completions", chunk, stream=True)
    assert chunks[-1]["usage"] == whole["usage"]  # completion_tokens_details included
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_prompt_opened_think_block(thinking_server: ServerHandle) -> None:
    """DeepSeek-R1 style: the generation prompt ends in `<think>\\n`, the reply only closes it.
    chat_template_kwargs reach the template: without enable_thinking the reply is plain text."""
    text = "Capitals are cities.</think>Paris."
    opened = chat(thinking_server, text, **THINKING)["choices"][0]["message"]
    assert opened["reasoning_content"] == "Capitals are cities."
    assert opened["content"] == "Paris."
    for kwargs in ({}, {"chat_template_kwargs": {"enable_thinking": False}}):
        plain = chat(thinking_server, text, **kwargs)["choices"][0]["message"]
        assert plain["content"] == text and "reasoning_content" not in plain


def test_no_think_block_is_plain_content(thinking_server: ServerHandle) -> None:
    body = chat(thinking_server, "Just Paris.")
    message = body["choices"][0]["message"]
    assert message["content"] == "Just Paris." and "reasoning_content" not in message
    assert "completion_tokens_details" not in body["usage"]


def test_max_tokens_inside_reasoning(thinking_server: ServerHandle) -> None:
    body = chat(thinking_server, REPLY, max_tokens=12)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["reasoning_content"] == REPLY[len("<think>") : 12]
    assert choice["message"]["content"] is None  # vLLM: nothing after the think block
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 12
    chunks = streamed_chat(thinking_server, REPLY, max_tokens=12)
    assert joined(chunks, "reasoning_content") == REPLY[len("<think>") : 12]
    assert not joined(chunks, "content")


def test_every_choice_is_split_and_counted(thinking_server: ServerHandle) -> None:
    body = chat(thinking_server, REPLY, n=2)
    assert [c["message"]["content"] for c in body["choices"]] == ["Paris.", "Paris."]
    one = len("<think>\nThe user asks for a capital.\n</think>")
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 2 * one
    chunks = streamed_chat(thinking_server, REPLY, n=2)
    for index in (0, 1):
        assert joined(chunks, "reasoning_content", index) == "\nThe user asks for a capital.\n"
        assert joined(chunks, "content", index) == "Paris."


def test_vllm_include_reasoning_at_its_default(thinking_server: ServerHandle) -> None:
    message = chat(thinking_server, REPLY, include_reasoning=True)["choices"][0]["message"]
    assert message["reasoning_content"] == "\nThe user asks for a capital.\n"
    with httpx.Client(base_url=thinking_server.url, timeout=60) as http:
        refused = http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": REPLY}],
                  "include_reasoning": False},
        )  # fmt: skip
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "include_reasoning"


def test_reasoning_parser_none_keeps_the_raw_text(raw_server: ServerHandle) -> None:
    body = chat(raw_server, REPLY)
    message = body["choices"][0]["message"]
    assert message["content"] == REPLY and "reasoning_content" not in message
    assert "completion_tokens_details" not in body["usage"]
    chunks = streamed_chat(raw_server, REPLY)
    assert joined(chunks, "content") == REPLY and joined(chunks, "reasoning_content") is None


def test_auto_leaves_templates_without_think_alone(server: ServerHandle) -> None:
    """mock://echo's template never mentions <think>: auto does not parse its replies."""
    message = chat(server, REPLY)["choices"][0]["message"]
    assert message["content"] == REPLY and "reasoning_content" not in message


def test_a_named_parser_parses_any_template(
    server_factory: Callable[..., ServerHandle],
) -> None:
    handle = server_factory(reasoning_parser="deepseek_r1")
    message = chat(handle, REPLY)["choices"][0]["message"]
    assert message["reasoning_content"] == "\nThe user asks for a capital.\n"
    assert message["content"] == "Paris."


def test_tool_call_after_reasoning(thinking_server: ServerHandle) -> None:
    """The tool-call parser sees the content only: a call after the think block is a call, and
    its reasoning is reasoning_content."""
    text = "<think>I should look it up.</think>\n" + CALL
    body = chat(thinking_server, text, tools=[WEATHER], tool_choice="auto")
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["reasoning_content"] == "I should look it up."
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Rome", "unit": "f"}
    chunks = streamed_chat(thinking_server, text, tools=[WEATHER], tool_choice="auto")
    assert joined(chunks, "reasoning_content") == "I should look it up."
    assert not joined(chunks, "content")
    calls = [
        c["choices"][0]["delta"]["tool_calls"]
        for c in chunks
        if "tool_calls" in c["choices"][0]["delta"]
    ]
    assert calls[0][0]["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    "constraint",
    [
        {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": {
            "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
            "required": ["city"], "additionalProperties": False}}}},
    ],
)  # fmt: skip
def test_a_grammar_from_the_first_token_leaves_no_reasoning(
    thinking_server: ServerHandle, constraint: dict[str, Any]
) -> None:
    """The prompt opens a think block, but the grammar writes the reply from its first token:
    the reply is parsed as content (a call, a JSON object), never lost as reasoning."""
    body = chat(thinking_server, "anything", max_tokens=400, seed=1, **THINKING, **constraint)
    (choice,) = body["choices"]
    message = choice["message"]
    assert "reasoning_content" not in message
    if "tools" in constraint:
        assert choice["finish_reason"] == "tool_calls"
        assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    else:
        assert choice["finish_reason"] == "stop"
        assert json.loads(message["content"])["city"] in ("Paris", "Rome")


def test_history_reasoning_is_accepted_and_rendered(thinking_server: ServerHandle) -> None:
    """Assistant turns may carry reasoning_content (or vLLM's `reasoning`): the template gets
    it as message.reasoning_content (the echo shows the rendered history)."""
    messages = [
        {"role": "user", "content": "Q1 "},
        {"role": "assistant", "content": "A1 ", "reasoning_content": "R1"},
        {"role": "user", "content": "Q2 "},
        {"role": "assistant", "content": "A2 ", "reasoning": "R2"},
        {"role": "user", "content": "Q3"},
    ]
    body = post(thinking_server, "/v1/chat/completions", {"messages": messages})
    assert body["choices"][0]["message"]["content"] == (
        "Q1 <think>R1</think>A1 Q2 <think>R2</think>A2 Q3"
    )


# --- configuration ----------------------------------------------------------------------------


def test_flag_and_environment_variable() -> None:
    def parse(*argv: str) -> Any:
        return config_from_args(build_parser().parse_args(["serve", "mock://echo", *argv]))

    assert parse().reasoning_parser == "auto"
    for name in ("none", "deepseek_r1", "qwen3", "auto"):
        assert parse("--reasoning-parser", name).reasoning_parser == name
        from_env = config_from_env(
            {"MLCTRIO_MODEL": "mock://echo", "MLCTRIO_REASONING_PARSER": name}
        )
        assert from_env == parse("--reasoning-parser", name)
    with pytest.raises(ConfigError, match="reasoning-parser"):
        config_from_env({"MLCTRIO_REASONING_PARSER": "granite"})
    with pytest.raises(SystemExit):
        parse("--reasoning-parser", "granite")
