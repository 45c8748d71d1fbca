"""Responses: to_json emits OpenAI's exact keys and nulls, matches the OpenAPI document, and the
official SDK's own types (and its stream parser) accept it."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import jsonschema
import openai
import pytest
from openai.types import Completion as SdkCompletion
from openai.types import Model as SdkModel
from openai.types.chat import ChatCompletion as SdkChatCompletion
from openai.types.chat import ChatCompletionChunk as SdkChatCompletionChunk

from mlctrio.errors import InvalidRequestError
from mlctrio.protocol.chat import FunctionCall, ToolCall
from mlctrio.protocol.chat_output import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionDelta,
    ChatCompletionMessage,
    ChoiceLogprobs,
    DeltaFunctionCall,
    DeltaToolCall,
    TokenLogprob,
    TopLogprob,
)
from mlctrio.protocol.common import (
    ErrorDetail,
    ErrorResponse,
    Model,
    ModelList,
    PromptTokensDetails,
    Usage,
)
from mlctrio.protocol.completions import (
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
)
from mlctrio.protocol.openai import to_json, to_json_bytes
from mlctrio.protocol.openapi import openapi_document
from mlctrio.protocol.tokenize import DetokenizeResponse, TokenizeResponse

USAGE = Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8)
LOGPROBS = ChoiceLogprobs(
    content=(
        TokenLogprob(
            token="Hi",
            logprob=-0.1,
            bytes=(72, 105),
            top_logprobs=(TopLogprob("Hi", -0.1, (72, 105)), TopLogprob("Yo", -2.5, None)),
        ),
    )
)
TOOL_CALL = ToolCall(
    id="call_1",
    type="function",
    function=FunctionCall(name="get_weather", arguments='{"city":"Paris"}'),
)


def chunk(*choices: ChatCompletionChunkChoice, **kwargs: Any) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="chatcmpl-1", created=1700000000, model="m", choices=choices, **kwargs
    )


CHAT_COMPLETION = ChatCompletion(
    id="chatcmpl-1",
    created=1700000000,
    model="m",
    choices=(
        ChatCompletionChoice(
            index=0,
            message=ChatCompletionMessage(content="Hi"),
            logprobs=LOGPROBS,
            finish_reason="stop",
        ),
        ChatCompletionChoice(
            index=1,
            message=ChatCompletionMessage(content=None, tool_calls=(TOOL_CALL,)),
            finish_reason="tool_calls",
        ),
    ),
    usage=Usage(
        prompt_tokens=5,
        completion_tokens=3,
        total_tokens=8,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=4),
    ),
)
FIRST_CHUNK = chunk(
    ChatCompletionChunkChoice(index=0, delta=ChatCompletionDelta(role="assistant", content="")),
    usage=None,
)
CONTENT_CHUNK = chunk(
    ChatCompletionChunkChoice(index=0, delta=ChatCompletionDelta(content="Hi"), logprobs=LOGPROBS)
)
TOOL_CHUNK = chunk(
    ChatCompletionChunkChoice(
        index=0,
        delta=ChatCompletionDelta(
            tool_calls=(
                DeltaToolCall(
                    index=0,
                    id="call_1",
                    type="function",
                    function=DeltaFunctionCall(name="get_weather", arguments=""),
                ),
            )
        ),
    )
)
LAST_CHUNK = chunk(
    ChatCompletionChunkChoice(index=0, delta=ChatCompletionDelta(), finish_reason="stop"),
    usage=None,
)
USAGE_CHUNK = chunk(usage=USAGE)
COMPLETION = Completion(
    id="cmpl-1",
    created=1700000000,
    model="m",
    choices=(
        CompletionChoice(
            index=0,
            text=" world",
            finish_reason="length",
            logprobs=CompletionLogprobs(
                tokens=("Hello", " world"),
                token_logprobs=(None, -0.5),
                top_logprobs=(None, {" world": -0.5, " there": -1.5}),
                text_offset=(0, 5),
            ),
        ),
    ),
    usage=USAGE,
)
COMPLETION_NO_ECHO = Completion(
    id="cmpl-2",
    created=1700000000,
    model="m",
    choices=(
        CompletionChoice(
            index=0,
            text=" world",
            finish_reason="stop",
            logprobs=CompletionLogprobs(
                tokens=(" world",),
                token_logprobs=(-0.5,),
                top_logprobs=({" world": -0.5},),
                text_offset=(5,),
            ),
        ),
    ),
    usage=USAGE,
)
COMPLETION_CHUNK = CompletionChunk(
    id="cmpl-1",
    created=1,
    model="m",
    choices=(CompletionChoice(index=0, text="x", finish_reason=None),),
)
MODEL = Model(id="m", created=1, owned_by="mlctrio", root="/models/m", max_model_len=4096)

# (value, its component in the OpenAPI document, the SDK type that must accept it or None)
SAMPLES: list[tuple[object, str, Any]] = [
    (CHAT_COMPLETION, "ChatCompletion", SdkChatCompletion),
    (FIRST_CHUNK, "ChatCompletionChunk", SdkChatCompletionChunk),
    (CONTENT_CHUNK, "ChatCompletionChunk", SdkChatCompletionChunk),
    (TOOL_CHUNK, "ChatCompletionChunk", SdkChatCompletionChunk),
    (LAST_CHUNK, "ChatCompletionChunk", SdkChatCompletionChunk),
    (USAGE_CHUNK, "ChatCompletionChunk", SdkChatCompletionChunk),
    # With echo the first prompt token has no logprob: OpenAI and vLLM send null there, which
    # the SDK's type does not allow; so only the schema checks this one.
    (COMPLETION, "Completion", None),
    (COMPLETION_NO_ECHO, "Completion", SdkCompletion),
    # The SDK types finish_reason as non-null, but OpenAI streams null until the last chunk.
    (COMPLETION_CHUNK, "CompletionChunk", None),
    (MODEL, "Model", SdkModel),
    (Model(id="m", created=1), "Model", SdkModel),
    (ModelList(data=(MODEL,)), "ModelList", None),
    (TokenizeResponse(tokens=(1, 2), count=2, max_model_len=4096), "TokenizeResponse", None),
    (DetokenizeResponse(prompt="hi"), "DetokenizeResponse", None),
    (
        ErrorResponse(ErrorDetail(message="bad", type="invalid_request_error", param="n")),
        "ErrorResponse",
        None,
    ),
]
DOCUMENT = openapi_document()


def _validator(component: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"#/components/schemas/{component}", "components": DOCUMENT["components"]}
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize(("value", "component", "sdk_type"), SAMPLES)
def test_json_matches_schema_and_sdk(value: object, component: str, sdk_type: Any) -> None:
    data = to_json(value)
    _validator(component).validate(data)
    assert json.loads(to_json_bytes(value)) == data
    if sdk_type is not None:
        parsed = sdk_type.model_validate(data)
        # the SDK reads back exactly what we sent (no key of ours was ignored)
        assert parsed.model_dump(exclude_unset=True) == data


def test_chat_completion_keys_and_nulls() -> None:
    data = to_json(CHAT_COMPLETION)
    assert list(data) == [
        "id",
        "object",
        "created",
        "model",
        "system_fingerprint",
        "choices",
        "usage",
    ]
    assert data["object"] == "chat.completion" and data["system_fingerprint"] is None
    first, second = data["choices"]
    assert first["message"] == {"role": "assistant", "content": "Hi", "refusal": None}
    assert first["logprobs"]["refusal"] is None
    assert first["logprobs"]["content"][0]["top_logprobs"][1] == {
        "token": "Yo",
        "logprob": -2.5,
        "bytes": None,
    }
    assert second["message"]["content"] is None
    assert second["message"]["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        }
    ]
    assert second["logprobs"] is None and second["finish_reason"] == "tool_calls"
    assert data["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}
    assert "prompt_tokens_details" not in to_json(USAGE)


def test_chunk_usage_key_follows_include_usage() -> None:
    assert "usage" not in to_json(CONTENT_CHUNK)  # include_usage off: no key at all
    assert to_json(FIRST_CHUNK)["usage"] is None  # include_usage on: null until the end
    final = to_json(USAGE_CHUNK)
    assert final["choices"] == [] and final["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "total_tokens": 8,
    }


def test_chunk_deltas_omit_empty_keys() -> None:
    assert to_json(FIRST_CHUNK)["choices"][0] == {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    }
    assert to_json(LAST_CHUNK)["choices"][0]["delta"] == {}
    assert to_json(TOOL_CHUNK)["choices"][0]["delta"] == {
        "tool_calls": [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ]
    }
    more = DeltaToolCall(index=0, function=DeltaFunctionCall(arguments='{"c'))
    assert to_json(more) == {"index": 0, "function": {"arguments": '{"c'}}


def test_completion_json() -> None:
    data = to_json(COMPLETION)
    assert data["object"] == "text_completion"
    assert data["choices"][0]["logprobs"] == {
        "tokens": ["Hello", " world"],
        "token_logprobs": [None, -0.5],
        "top_logprobs": [None, {" world": -0.5, " there": -1.5}],
        "text_offset": [0, 5],
    }
    streamed = to_json(COMPLETION_CHUNK)
    assert streamed["choices"] == [
        {"index": 0, "text": "x", "logprobs": None, "finish_reason": None}
    ]
    assert "usage" not in streamed


def test_model_omits_unknown_extras() -> None:
    assert to_json(Model(id="m", created=1)) == {
        "id": "m",
        "object": "model",
        "created": 1,
        "owned_by": "mlctrio",
    }
    assert to_json(MODEL)["max_model_len"] == 4096


def test_error_response_matches_errors_module() -> None:
    error = InvalidRequestError("bad n", param="n")
    body = ErrorResponse(
        ErrorDetail(message=error.message, type=error.type, param=error.param, code=error.code)
    )
    assert to_json(body) == error.to_dict()


def test_schema_rejects_a_missing_null() -> None:
    """The output schemas require the keys OpenAI always sends, so dropping one is caught."""
    data = to_json(CHAT_COMPLETION)
    del data["choices"][0]["message"]["refusal"]
    with pytest.raises(jsonschema.ValidationError):
        _validator("ChatCompletion").validate(data)
    data = to_json(FIRST_CHUNK)
    data["choices"][0]["delta"]["bogus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        _validator("ChatCompletionChunk").validate(data)


# --- the SDK end to end over a mock transport ------------------------------------------------


def _sse(*events: object) -> bytes:
    return b"".join(b"data: " + to_json_bytes(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def _client(body: bytes, content_type: str) -> openai.OpenAI:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=body, headers={"content-type": content_type})

    return openai.OpenAI(
        api_key="k",
        base_url="http://mlctrio.test/v1",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )


def test_sdk_reads_a_completion() -> None:
    client = _client(to_json_bytes(CHAT_COMPLETION), "application/json")
    result = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert result.choices[0].message.content == "Hi"
    assert result.choices[1].message.tool_calls is not None
    assert result.usage is not None and result.usage.prompt_tokens_details is not None
    assert result.usage.prompt_tokens_details.cached_tokens == 4


def test_sdk_reads_a_stream() -> None:
    rest = chunk(
        ChatCompletionChunkChoice(index=0, delta=ChatCompletionDelta(content=" there")), usage=None
    )
    client = _client(_sse(FIRST_CHUNK, rest, LAST_CHUNK, USAGE_CHUNK), "text/event-stream")
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " there"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 8


def test_sdk_stream_helper_accumulates_tool_calls() -> None:
    def args(text: str) -> ChatCompletionChunk:
        return chunk(
            ChatCompletionChunkChoice(
                index=0,
                delta=ChatCompletionDelta(
                    tool_calls=(DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text)),)
                ),
            )
        )

    end = chunk(
        ChatCompletionChunkChoice(index=0, delta=ChatCompletionDelta(), finish_reason="tool_calls")
    )
    body = _sse(FIRST_CHUNK, TOOL_CHUNK, args('{"city":'), args('"Paris"}'), end)
    client = _client(body, "text/event-stream")
    with client.chat.completions.stream(
        model="m",
        messages=[{"role": "user", "content": "x"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
    ) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls is not None and calls[0].function.arguments == '{"city":"Paris"}'
    assert calls[0].id == "call_1" and final.choices[0].finish_reason == "tool_calls"


def test_sdk_reads_a_completion_stream() -> None:
    last = CompletionChunk(
        id="cmpl-1",
        created=1,
        model="m",
        choices=(CompletionChoice(index=0, text="y", finish_reason="stop"),),
    )
    client = _client(_sse(COMPLETION_CHUNK, last), "text/event-stream")
    chunks = list(client.completions.create(model="m", prompt="p", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "xy"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_json_bytes_are_compact_utf8() -> None:
    value = DetokenizeResponse(prompt="héllo ✓")
    assert to_json_bytes(value) == '{"prompt":"héllo ✓"}'.encode()
