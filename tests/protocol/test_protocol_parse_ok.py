"""Good bodies parse into the values the server uses, including what the openai SDK sends."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import openai
import pydantic
import pytest

from mlctrio.protocol.chat import (
    AssistantMessage,
    ChatCompletionRequest,
    DeveloperMessage,
    NamedToolChoice,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    ResponseFormatText,
    SystemMessage,
    TextContentPart,
    ToolMessage,
    UserMessage,
    content_text,
)
from mlctrio.protocol.completions import CompletionRequest
from mlctrio.protocol.openai import (
    parse_chat_request,
    parse_completion_request,
    parse_detokenize_request,
    parse_tokenize_request,
)
from mlctrio.protocol.tokenize import TokenizeChatRequest, TokenizeCompletionRequest

USER = {"role": "user", "content": "hi"}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            "strict": True,
        },
    }
]


def test_minimal_chat_keeps_defaults_unset() -> None:
    request = parse_chat_request({"model": "m", "messages": [USER]})
    assert request == ChatCompletionRequest(model="m", messages=(UserMessage("user", "hi"),))
    assert request.temperature is None and request.n is None and request.stream is None
    assert request.stop_sequences == ()
    assert request.max_output_tokens is None
    assert request.include_usage is False


def test_full_chat_request() -> None:
    request = parse_chat_request(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief", "name": "sys"},
                {
                    "role": "developer",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                USER,
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
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "assistant", "content": "It is sunny.", "refusal": None, "name": "bot"},
            ],
            "max_tokens": 100,
            "max_completion_tokens": 50,
            "n": 2,
            "temperature": 0,
            "top_p": 1,
            "presence_penalty": -2,
            "frequency_penalty": 2.0,
            "logit_bias": {"0": -100, "50256": 100, "7": 0.5},
            "logprobs": True,
            "top_logprobs": 20,
            "seed": -5,
            "stop": ["\n", "END"],
            "stream": True,
            "stream_options": {"include_usage": True, "include_obfuscation": False},
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "weather",
                    "schema": {"type": "object"},
                    "strict": True,
                    "description": "d",
                },
            },
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False,
            "user": "u1",
            "top_k": -1,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "ignore_eos": True,
            "stop_token_ids": [0, 2],
            "skip_special_tokens": False,
        }
    )
    system, developer, user, call, tool, reply = request.messages
    assert system == SystemMessage("system", "be brief", name="sys")
    assert isinstance(developer, DeveloperMessage)
    assert developer.content == (TextContentPart("text", "a"), TextContentPart("text", "b"))
    assert content_text(developer.content) == "ab"
    assert user == UserMessage("user", "hi")
    assert isinstance(call, AssistantMessage) and call.content is None and call.tool_calls
    assert call.tool_calls[0].function.arguments == '{"city": "Paris"}'
    assert tool == ToolMessage("tool", "sunny", "call_1")
    assert isinstance(reply, AssistantMessage) and reply.name == "bot"
    assert request.max_output_tokens == 50  # the smaller of the two limits
    assert request.temperature == 0.0 and isinstance(request.temperature, float)
    assert request.logit_bias == {0: -100.0, 50256: 100.0, 7: 0.5}
    assert request.stop_sequences == ("\n", "END")
    assert request.include_usage is True
    assert isinstance(request.response_format, ResponseFormatJsonSchema)
    assert request.response_format.json_schema.schema == {"type": "object"}
    assert request.tools is not None and request.tools[0].function.strict is True
    assert request.tool_choice == NamedToolChoice(
        "function", type(request.tool_choice.function)("get_weather")
    )  # type: ignore[union-attr]
    assert request.top_k == -1 and request.stop_token_ids == (0, 2)
    assert request.skip_special_tokens is False


@pytest.mark.parametrize(
    ("changes", "check"),
    [
        ({"stop": "###"}, lambda r: r.stop_sequences == ("###",)),
        ({"stop": [str(i) for i in range(16)]}, lambda r: len(r.stop_sequences) == 16),
        ({"stop": None}, lambda r: r.stop_sequences == ()),
        ({"max_tokens": 10, "max_completion_tokens": 30}, lambda r: r.max_output_tokens == 10),
        ({"max_completion_tokens": 7}, lambda r: r.max_output_tokens == 7),
        (
            {"response_format": {"type": "text"}},
            lambda r: r.response_format == ResponseFormatText("text"),
        ),
        (
            {"response_format": {"type": "json_object"}},
            lambda r: r.response_format == ResponseFormatJsonObject("json_object"),
        ),
        (
            {"response_format": {"type": "json_object", "schema": '{"type": "object"}'}},
            lambda r: r.response_format.schema == '{"type": "object"}',
        ),
        ({"tools": TOOLS, "tool_choice": "required"}, lambda r: r.tool_choice == "required"),
        ({"tool_choice": "none"}, lambda r: r.tool_choice == "none"),
        ({"tool_choice": "auto"}, lambda r: r.tool_choice == "auto"),
        ({"logprobs": True, "top_logprobs": 0}, lambda r: r.top_logprobs == 0),
        ({"temperature": 2, "top_p": 0.01, "n": 128}, lambda r: r.n == 128),
        ({"seed": 2**63 - 1}, lambda r: r.seed == 2**63 - 1),
        ({"top_k": 1}, lambda r: r.top_k == 1),
        ({"min_p": 0, "repetition_penalty": 0.5}, lambda r: r.repetition_penalty == 0.5),
        (
            {"stream": True, "stream_options": {"include_usage": False}},
            lambda r: r.include_usage is False,
        ),
        ({"stream": True, "stream_options": None}, lambda r: r.stream_options is None),
        # OpenAI fields accepted with their default value (and dropped)
        (
            {
                "service_tier": "auto",
                "store": False,
                "modalities": ["text"],
                "metadata": None,
                "audio": None,
                "reasoning_effort": None,
                "prompt_cache_key": "k",
                "safety_identifier": "s",
            },
            lambda r: r.model == "m",
        ),
        (
            {"messages": [{"role": "user", "content": []}]},
            lambda r: content_text(r.messages[0].content) == "",
        ),
        (
            {"messages": [USER, {"role": "assistant", "content": "", "tool_calls": None}]},
            lambda r: r.messages[1].content == "",
        ),
        (
            {
                "messages": [
                    USER,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "a",
                                "type": "function",
                                "function": {"name": "f", "arguments": ""},
                            }
                        ],
                    },
                ]
            },
            lambda r: r.messages[1].content is None,
        ),
    ],
)
def test_chat_variants(changes: dict[str, Any], check: Any) -> None:
    body = {"model": "m", "messages": [USER], **changes}
    assert check(parse_chat_request(body))


@pytest.mark.parametrize(
    ("prompt", "prompts"),
    [
        ("hello", ("hello",)),
        ("", ("",)),
        (["a", "b"], ("a", "b")),
        ([1, 2, 3], ((1, 2, 3),)),
        ([[1, 2], [3]], ((1, 2), (3,))),
    ],
)
def test_completion_prompt_shapes(prompt: object, prompts: tuple[object, ...]) -> None:
    request = parse_completion_request({"model": "m", "prompt": prompt})
    assert request.prompts == prompts
    assert request.max_output_tokens == 16  # OpenAI's default for text completions


def test_full_completion_request() -> None:
    request = parse_completion_request(
        {
            "model": "m",
            "prompt": "x",
            "echo": True,
            "logprobs": 5,
            "best_of": 3,
            "n": 3,
            "suffix": None,
            "max_tokens": 1,
            "stop": "\n",
            "seed": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "u",
            "logit_bias": {"1": 1},
            "top_k": 40,
            "ignore_eos": False,
            "stop_token_ids": [],
            "skip_special_tokens": True,
        }
    )
    assert request == CompletionRequest(
        model="m",
        prompt="x",
        echo=True,
        logprobs=5,
        best_of=3,
        n=3,
        max_tokens=1,
        stop="\n",
        seed=1,
        stream=True,
        stream_options=request.stream_options,
        user="u",
        logit_bias={1: 1.0},
        top_k=40,
        ignore_eos=False,
        stop_token_ids=(),
        skip_special_tokens=True,
    )
    assert request.max_output_tokens == 1 and request.include_usage
    assert parse_completion_request({"model": "m", "prompt": "x", "best_of": 1}).best_of == 1
    assert parse_completion_request({"model": "m", "prompt": "x", "logprobs": 0}).logprobs == 0
    assert parse_completion_request({"model": "m", "prompt": "x", "suffix": ""}).prompt == "x"


def test_tokenize_and_detokenize() -> None:
    plain = parse_tokenize_request({"prompt": "hi", "add_special_tokens": False})
    assert plain == TokenizeCompletionRequest(prompt="hi", add_special_tokens=False)
    templated = parse_tokenize_request(
        {"model": "m", "messages": [USER], "add_generation_prompt": True}
    )
    assert isinstance(templated, TokenizeChatRequest)
    assert templated.messages == (UserMessage("user", "hi"),) and templated.model == "m"
    assert parse_detokenize_request({"tokens": [1, 2], "model": "m"}).tokens == (1, 2)
    assert parse_detokenize_request({"tokens": []}).tokens == ()


# --- what the official SDK sends ------------------------------------------------------------


class _Capture:
    """An httpx2 transport handler that records request bodies and answers with a fixed body."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.answer = answer

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.bodies.append(json.loads(request.content))
        return httpx2.Response(200, json=self.answer)

    def client(self) -> openai.OpenAI:
        transport = httpx2.MockTransport(self)
        return openai.OpenAI(
            api_key="k",
            base_url="http://mlctrio.test/v1",
            http_client=httpx2.Client(transport=transport),
            max_retries=0,
        )


CHAT_ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "system_fingerprint": None,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": '{"city": "Paris"}', "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}
COMPLETION_ANSWER = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1,
    "model": "m",
    "system_fingerprint": None,
    "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


class City(pydantic.BaseModel):
    city: str


def test_sdk_chat_bodies_parse() -> None:
    capture = _Capture(CHAT_ANSWER)
    client = capture.client()
    client.chat.completions.create(
        model="m",
        messages=[
            {"role": "developer", "content": "d"},
            {"role": "user", "content": [{"type": "text", "text": "weather?"}], "name": "me"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "sun"}]},
        ],
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=True,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": City.model_json_schema(), "strict": True},
        },
        max_completion_tokens=20,
        temperature=0.7,
        top_p=0.9,
        n=1,
        seed=3,
        stop=["x"],
        logprobs=True,
        top_logprobs=3,
        logit_bias={"42": -5},
        presence_penalty=0.1,
        frequency_penalty=0.1,
        user="u",
        store=False,
        service_tier="auto",
        extra_body={
            "top_k": 20,
            "min_p": 0.1,
            "repetition_penalty": 1.05,
            "ignore_eos": False,
            "stop_token_ids": [7],
            "skip_special_tokens": True,
        },
    )
    stream = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    stream.close()
    client.chat.completions.parse(
        model="m", messages=[{"role": "user", "content": "hi"}], response_format=City
    )
    client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        tools=[openai.pydantic_function_tool(City, name="set_city")],
        tool_choice="required",
    )
    assert len(capture.bodies) == 4
    first, streamed, parsed, strict_tools = (parse_chat_request(b) for b in capture.bodies)
    assert first.top_k == 20 and first.stop_token_ids == (7,) and first.logit_bias == {42: -5.0}
    assert isinstance(first.tool_choice, NamedToolChoice)
    assert isinstance(first.response_format, ResponseFormatJsonSchema)
    assert streamed.stream is True and streamed.include_usage is True
    assert isinstance(parsed.response_format, ResponseFormatJsonSchema)
    assert parsed.response_format.json_schema.strict is True
    assert parsed.response_format.json_schema.name == "City"
    assert strict_tools.tools is not None and strict_tools.tools[0].function.name == "set_city"
    assert strict_tools.tools[0].function.strict is True


def test_sdk_completion_bodies_parse() -> None:
    capture = _Capture(COMPLETION_ANSWER)
    client = capture.client()
    for prompt in ("a", ["a", "b"], [1, 2], [[1], [2, 3]]):
        client.completions.create(
            model="m",
            prompt=prompt,
            max_tokens=5,
            echo=True,
            logprobs=2,
            best_of=1,
            n=1,
            stop="\n",
            seed=1,
            suffix=None,
            extra_body={"top_k": 5, "ignore_eos": True},
        )
    requests = [parse_completion_request(b) for b in capture.bodies]
    assert [r.prompts for r in requests] == [("a",), ("a", "b"), ((1, 2),), ((1,), (2, 3))]
    assert all(r.logprobs == 2 and r.top_k == 5 and r.ignore_eos for r in requests)
