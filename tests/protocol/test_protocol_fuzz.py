"""Property tests: whatever JSON arrives, parse_* returns a value or raises InvalidRequestError."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlctrio.errors import InvalidRequestError
from mlctrio.protocol.chat import ChatCompletionRequest
from mlctrio.protocol.completions import CompletionRequest
from mlctrio.protocol.openai import (
    parse_chat_request,
    parse_completion_request,
    parse_detokenize_request,
    parse_tokenize_request,
    to_json,
)
from mlctrio.protocol.tokenize import DetokenizeRequest, TokenizeChatRequest

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-3, 200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(-3, 3)
    | st.text(max_size=8)
    | st.sampled_from(["text", "user", "function", "auto", "1"])
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=8) | st.sampled_from(["role", "type", "content"]), children, max_size=4
        )
    ),
    max_leaves=20,
)

Parser = Callable[[object], object]
PARSERS: list[Parser] = [
    parse_chat_request,
    parse_completion_request,
    parse_tokenize_request,
    parse_detokenize_request,
]

CHAT_BODY: dict[str, Any] = {
    "model": "m",
    "messages": [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ],
    "stream": True,
}
CHAT_FIELDS = sorted(
    {f.alias or f.name for f in attrs.fields(ChatCompletionRequest)}
    | {"store", "audio", "modalities", "functions", "bogus"}
)
COMPLETION_FIELDS = sorted(
    {f.alias or f.name for f in attrs.fields(CompletionRequest)} | {"suffix", "bogus"}
)


def _accepts_or_rejects(parse: Parser, body: object) -> object | None:
    try:
        return parse(body)
    except InvalidRequestError as e:
        assert e.status == 400
        assert e.message
        return None


@SETTINGS
@given(parse=st.sampled_from(PARSERS), body=json_values)
def test_random_json_only_raises_invalid_request(parse: Parser, body: object) -> None:
    _accepts_or_rejects(parse, body)


@SETTINGS
@given(field=st.sampled_from(CHAT_FIELDS), value=json_values)
def test_one_chat_field_replaced(field: str, value: object) -> None:
    body = copy.deepcopy(CHAT_BODY)
    body[field] = value
    try:
        request = parse_chat_request(body)
    except InvalidRequestError as e:
        # the error points at the replaced field (or below it), never somewhere else
        assert e.param is not None
        assert e.param == field or e.param.startswith(field + ".")
        return
    assert isinstance(request, ChatCompletionRequest)
    assert parse_chat_request(to_json(request)) == request  # accepted values survive a trip


@SETTINGS
@given(field=st.sampled_from(COMPLETION_FIELDS), value=json_values)
def test_one_completion_field_replaced(field: str, value: object) -> None:
    body = {"model": "m", "prompt": "p", field: value}
    try:
        request = parse_completion_request(body)
    except InvalidRequestError as e:
        assert e.param is not None
        assert e.param == field or e.param.startswith(field + ".")
        return
    assert request.prompts and all(isinstance(p, str | tuple) for p in request.prompts)
    assert parse_completion_request(to_json(request)) == request


@SETTINGS
@given(message=json_values)
def test_random_message(message: object) -> None:
    body = {"messages": [{"role": "user", "content": "a"}, message]}
    result = _accepts_or_rejects(parse_tokenize_request, body)
    if result is not None:
        assert isinstance(result, TokenizeChatRequest) and len(result.messages) == 2


@SETTINGS
@given(tokens=st.lists(st.integers(min_value=0, max_value=2**40), max_size=10))
def test_token_lists_round_trip(tokens: list[int]) -> None:
    request = parse_detokenize_request({"tokens": tokens})
    assert request == DetokenizeRequest(tokens=tuple(tokens))
    completion = parse_completion_request({"model": "m", "prompt": tokens or [0]})
    assert completion.prompts == (tuple(tokens or [0]),)


@SETTINGS
@given(
    temperature=st.floats(0, 2),
    top_p=st.floats(0, 1, exclude_min=True),
    n=st.integers(1, 128),
    stop=st.lists(st.text(min_size=1), max_size=16),
)
def test_in_range_values_are_kept_exactly(
    temperature: float, top_p: float, n: int, stop: list[str]
) -> None:
    request = parse_chat_request(
        {**CHAT_BODY, "temperature": temperature, "top_p": top_p, "n": n, "stop": stop}
    )
    assert (request.temperature, request.top_p, request.n) == (temperature, top_p, n)
    assert request.stop_sequences == tuple(stop)


def test_request_json_round_trip() -> None:
    body = {
        **CHAT_BODY,
        "logit_bias": {"5": 1.5},
        "stop": "x",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"a": [1]}}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
    }
    request = parse_chat_request(body)
    data = to_json(request)
    assert data["logit_bias"] == {"5": 1.5}
    assert data["messages"][1]["content"] == [{"type": "text", "text": "hi"}]
    assert parse_chat_request(data) == request
