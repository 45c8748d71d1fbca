"""Every validation rule: a bad body -> InvalidRequestError (400) naming the offending param."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest

from mlctrio.errors import InvalidRequestError
from mlctrio.protocol.openai import (
    parse_chat_request,
    parse_completion_request,
    parse_detokenize_request,
    parse_tokenize_request,
)

DROP = object()  # marks a key to remove from the base body

CHAT_BASE: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION_BASE: dict[str, Any] = {"model": "m", "prompt": "hi"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
USER = {"role": "user", "content": "hi"}


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(base)
    for key, value in changes.items():
        if value is DROP:
            del body[key]
        else:
            body[key] = value
    return body


def chat(**changes: Any) -> dict[str, Any]:
    return _with(CHAT_BASE, **changes)


def msgs(*messages: Any, **changes: Any) -> dict[str, Any]:
    return chat(messages=list(messages), **changes)


def completion(**changes: Any) -> dict[str, Any]:
    return _with(COMPLETION_BASE, **changes)


# (id, body, expected param). Ids are stable so that test_protocol_openapi.py can refer to them.
CHAT_CASES: list[tuple[str, object, str | None]] = [
    ("not-object-list", [], None),
    ("not-object-str", "hello", None),
    ("not-object-null", None, None),
    ("missing-model", chat(model=DROP), "model"),
    ("missing-messages", chat(messages=DROP), "messages"),
    ("model-int", chat(model=1), "model"),
    ("messages-empty", chat(messages=[]), "messages"),
    ("messages-str", chat(messages="hi"), "messages"),
    ("message-str", msgs("hi"), "messages.0"),
    ("message-no-role", msgs({"content": "hi"}), "messages.0.role"),
    ("role-function", msgs({"role": "function", "name": "f", "content": "x"}), "messages.0.role"),
    ("role-unknown", msgs({"role": "bot", "content": "x"}), "messages.0.role"),
    ("role-int", msgs({"role": 1, "content": "x"}), "messages.0.role"),
    ("user-no-content", msgs({"role": "user"}), "messages.0.content"),
    ("user-content-null", msgs({"role": "user", "content": None}), "messages.0.content"),
    ("content-int", msgs({"role": "user", "content": 5}), "messages.0.content"),
    (
        "content-image",
        msgs(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                ],
            }
        ),
        "messages.0.content.1.type",
    ),
    (
        "content-audio",
        msgs(
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                ],
            }
        ),
        "messages.0.content.0.type",
    ),
    (
        "content-part-no-text",
        msgs({"role": "user", "content": [{"type": "text"}]}),
        "messages.0.content.0.text",
    ),
    (
        "content-part-no-type",
        msgs({"role": "user", "content": [{"text": "a"}]}),
        "messages.0.content.0.type",
    ),
    (
        "content-part-extra",
        msgs({"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}),
        "messages.0.content.0.x",
    ),
    ("content-part-str", msgs({"role": "system", "content": ["a"]}), "messages.0.content.0"),
    ("message-unknown-key", msgs({"role": "user", "content": "hi", "foo": 1}), "messages.0.foo"),
    ("message-name-int", msgs({"role": "user", "content": "hi", "name": 3}), "messages.0.name"),
    ("assistant-no-content", msgs(USER, {"role": "assistant"}), "messages.1.content"),
    (
        "assistant-null-content",
        msgs(USER, {"role": "assistant", "content": None}),
        "messages.1.content",
    ),
    (
        "tool-call-no-arguments",
        msgs(
            USER,
            {
                "role": "assistant",
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f"}}],
            },
        ),
        "messages.1.tool_calls.0.function.arguments",
    ),
    (
        "tool-call-custom",
        msgs(
            USER,
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "type": "custom", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
        ),
        "messages.1.tool_calls.0.type",
    ),
    (
        "tool-call-no-id",
        msgs(
            USER,
            {
                "role": "assistant",
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
        ),
        "messages.1.tool_calls.0.id",
    ),
    ("tool-no-call-id", msgs(USER, {"role": "tool", "content": "42"}), "messages.1.tool_call_id"),
    (
        "assistant-function-call",
        msgs(
            USER,
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "f", "arguments": "{}"},
            },
        ),
        "messages.1.function_call",
    ),
    ("max-tokens-zero", chat(max_tokens=0), "max_tokens"),
    ("max-tokens-negative", chat(max_tokens=-1), "max_tokens"),
    ("max-tokens-str", chat(max_tokens="1"), "max_tokens"),
    ("max-tokens-float", chat(max_tokens=1.5), "max_tokens"),
    ("max-tokens-integral-float", chat(max_tokens=10.0), "max_tokens"),
    ("max-tokens-bool", chat(max_tokens=True), "max_tokens"),
    ("max-completion-tokens-zero", chat(max_completion_tokens=0), "max_completion_tokens"),
    ("n-zero", chat(n=0), "n"),
    ("n-too-big", chat(n=129), "n"),
    ("temperature-low", chat(temperature=-0.1), "temperature"),
    ("temperature-high", chat(temperature=2.1), "temperature"),
    ("temperature-str", chat(temperature="1"), "temperature"),
    ("temperature-bool", chat(temperature=True), "temperature"),
    ("temperature-nan", chat(temperature=math.nan), "temperature"),
    ("temperature-inf", chat(temperature=math.inf), "temperature"),
    ("temperature-huge-int", chat(temperature=10**400), "temperature"),
    ("top-p-zero", chat(top_p=0), "top_p"),
    ("top-p-high", chat(top_p=1.01), "top_p"),
    ("presence-penalty-low", chat(presence_penalty=-2.5), "presence_penalty"),
    ("frequency-penalty-high", chat(frequency_penalty=2.5), "frequency_penalty"),
    ("logit-bias-list", chat(logit_bias=[]), "logit_bias"),
    ("logit-bias-word-key", chat(logit_bias={"hello": 1}), "logit_bias.hello"),
    ("logit-bias-negative-key", chat(logit_bias={"-1": 1}), "logit_bias.-1"),
    ("logit-bias-padded-key", chat(logit_bias={"007": 1}), "logit_bias.007"),
    ("logit-bias-high", chat(logit_bias={"5": 101}), "logit_bias.5"),
    ("logit-bias-low", chat(logit_bias={"5": -100.5}), "logit_bias.5"),
    ("logit-bias-str-value", chat(logit_bias={"5": "1"}), "logit_bias.5"),
    ("logprobs-str", chat(logprobs="yes"), "logprobs"),
    ("top-logprobs-high", chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("top-logprobs-negative", chat(logprobs=True, top_logprobs=-1), "top_logprobs"),
    ("top-logprobs-without-logprobs", chat(top_logprobs=2), "top_logprobs"),
    ("top-logprobs-logprobs-false", chat(logprobs=False, top_logprobs=0), "top_logprobs"),
    ("seed-float", chat(seed=1.5), "seed"),
    ("seed-str", chat(seed="1"), "seed"),
    ("seed-too-big", chat(seed=2**63), "seed"),
    ("stop-int", chat(stop=5), "stop"),
    ("stop-empty-string", chat(stop=""), "stop"),
    ("stop-empty-item", chat(stop=["a", ""]), "stop.1"),
    ("stop-int-item", chat(stop=[1]), "stop.0"),
    ("stop-too-many", chat(stop=[str(i) for i in range(17)]), "stop"),
    ("stream-str", chat(stream="true"), "stream"),
    ("stream-options-no-stream", chat(stream_options={"include_usage": True}), "stream_options"),
    (
        "stream-options-stream-false",
        chat(stream=False, stream_options={"include_usage": True}),
        "stream_options",
    ),
    (
        "stream-options-bad-type",
        chat(stream=True, stream_options={"include_usage": "yes"}),
        "stream_options.include_usage",
    ),
    ("stream-options-unknown", chat(stream=True, stream_options={"foo": 1}), "stream_options.foo"),
    ("response-format-str", chat(response_format="json"), "response_format"),
    ("response-format-no-type", chat(response_format={}), "response_format.type"),
    ("response-format-xml", chat(response_format={"type": "xml"}), "response_format.type"),
    (
        "json-schema-missing",
        chat(response_format={"type": "json_schema"}),
        "response_format.json_schema",
    ),
    (
        "json-schema-no-name",
        chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
        "response_format.json_schema.name",
    ),
    (
        "json-schema-bad-name",
        chat(response_format={"type": "json_schema", "json_schema": {"name": "a b"}}),
        "response_format.json_schema.name",
    ),
    (
        "json-schema-schema-str",
        chat(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": "{}"}}),
        "response_format.json_schema.schema",
    ),
    (
        "json-object-schema-not-json",
        chat(response_format={"type": "json_object", "schema": "{"}),
        "response_format.schema",
    ),
    (
        "json-object-schema-not-object",
        chat(response_format={"type": "json_object", "schema": "[]"}),
        "response_format.schema",
    ),
    (
        "json-object-schema-dict",
        chat(response_format={"type": "json_object", "schema": {}}),
        "response_format.schema",
    ),
    ("tools-empty", chat(tools=[]), "tools"),
    ("tools-dict", chat(tools={"type": "function"}), "tools"),
    ("tool-no-function", chat(tools=[{"type": "function"}]), "tools.0.function"),
    ("tool-custom", chat(tools=[{"type": "custom", "custom": {"name": "x"}}]), "tools.0.type"),
    (
        "tool-no-name",
        chat(tools=[{"type": "function", "function": {"parameters": {}}}]),
        "tools.0.function.name",
    ),
    (
        "tool-bad-name",
        chat(tools=[{"type": "function", "function": {"name": "get weather"}}]),
        "tools.0.function.name",
    ),
    (
        "tool-parameters-str",
        chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "{}"}}]),
        "tools.0.function.parameters",
    ),
    ("tool-choice-unknown", chat(tools=TOOLS, tool_choice="any"), "tool_choice"),
    ("tool-choice-required-no-tools", chat(tool_choice="required"), "tool_choice"),
    (
        "tool-choice-named-no-tools",
        chat(tool_choice={"type": "function", "function": {"name": "get_weather"}}),
        "tool_choice",
    ),
    (
        "tool-choice-named-missing",
        chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
        "tool_choice.function.name",
    ),
    (
        "tool-choice-no-function",
        chat(tools=TOOLS, tool_choice={"type": "function"}),
        "tool_choice.function",
    ),
    (
        "tool-choice-allowed-tools",
        chat(
            tools=TOOLS,
            tool_choice={"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}},
        ),
        "tool_choice.type",
    ),
    ("parallel-tool-calls-str", chat(parallel_tool_calls="no"), "parallel_tool_calls"),
    ("user-int", chat(user=1), "user"),
    ("top-k-minus-two", chat(top_k=-2), "top_k"),
    ("top-k-float", chat(top_k=1.5), "top_k"),
    ("min-p-high", chat(min_p=1.5), "min_p"),
    ("repetition-penalty-zero", chat(repetition_penalty=0), "repetition_penalty"),
    ("ignore-eos-int", chat(ignore_eos=1), "ignore_eos"),
    ("stop-token-ids-negative", chat(stop_token_ids=[2, -1]), "stop_token_ids.1"),
    ("stop-token-ids-str", chat(stop_token_ids="1"), "stop_token_ids"),
    ("skip-special-tokens-str", chat(skip_special_tokens="no"), "skip_special_tokens"),
    ("unknown-field", chat(temprature=0.5), "temprature"),
    # vLLM's extensions (protocol/vllm.py)
    ("min-tokens-negative", chat(min_tokens=-1), "min_tokens"),
    ("include-stop-str-int", chat(include_stop_str_in_output=1), "include_stop_str_in_output"),
    ("guided-choice-empty", chat(guided_choice=[]), "guided_choice"),
    ("guided-regex-list", chat(guided_regex=["a"]), "guided_regex"),
    ("guided-two", chat(guided_regex="a", guided_choice=["b"]), "guided_choice"),
    ("structured-outputs-none-set", chat(structured_outputs={}), "structured_outputs"),
    ("structured-outputs-unknown", chat(structured_outputs={"x": 1}), "structured_outputs.x"),
    ("template-kwargs-list", chat(chat_template_kwargs=[1]), "chat_template_kwargs"),
    (
        "template-kwargs-reserved",
        chat(chat_template_kwargs={"tools": []}),
        "chat_template_kwargs.tools",
    ),
]

CHAT_CASES.append(
    ("reasoning-effort-unknown", chat(reasoning_effort="extreme"), "reasoning_effort")
)

# OpenAI fields mlctrio cannot honour with a non-default value.
UNSUPPORTED_CHAT_CASES: list[tuple[str, object, str | None]] = [
    ("audio", chat(audio={"voice": "alloy", "format": "wav"}), "audio"),
    ("modalities-audio", chat(modalities=["text", "audio"]), "modalities"),
    ("prediction", chat(prediction={"type": "content", "content": "x"}), "prediction"),
    ("web-search", chat(web_search_options={}), "web_search_options"),
    ("service-tier-flex", chat(service_tier="flex"), "service_tier"),
    ("store-true", chat(store=True), "store"),
    ("metadata", chat(metadata={"a": "b"}), "metadata"),
    ("verbosity", chat(verbosity="low"), "verbosity"),
    ("functions", chat(functions=[{"name": "f", "parameters": {}}]), "functions"),
    ("function-call", chat(function_call="auto"), "function_call"),
    ("prompt-cache-key-int", chat(prompt_cache_key=1), "prompt_cache_key"),
    ("best-of-in-chat", chat(best_of=2), "best_of"),
    ("use-beam-search", chat(use_beam_search=True), "use_beam_search"),
    ("prompt-logprobs", chat(prompt_logprobs=1), "prompt_logprobs"),
    ("chat-template", chat(chat_template="{{ messages }}"), "chat_template"),
]

COMPLETION_CASES: list[tuple[str, object, str | None]] = [
    ("not-object", [1, 2], None),
    ("missing-model", completion(model=DROP), "model"),
    ("missing-prompt", completion(prompt=DROP), "prompt"),
    ("prompt-null", completion(prompt=None), "prompt"),
    ("prompt-empty-list", completion(prompt=[]), "prompt"),
    ("prompt-int", completion(prompt=5), "prompt"),
    ("prompt-dict", completion(prompt={"text": "x"}), "prompt"),
    ("prompt-empty-ids", completion(prompt=[[]]), "prompt.0"),
    ("prompt-negative-id", completion(prompt=[5, -1]), "prompt.1"),
    ("prompt-negative-nested-id", completion(prompt=[[1], [1, -2]]), "prompt.1.1"),
    ("prompt-mixed", completion(prompt=[1, "a"]), "prompt"),
    ("prompt-bools", completion(prompt=[True]), "prompt"),
    ("prompt-float-ids", completion(prompt=[1.0]), "prompt"),
    ("echo-str", completion(echo="yes"), "echo"),
    ("logprobs-high", completion(logprobs=6), "logprobs"),
    ("logprobs-bool", completion(logprobs=True), "logprobs"),
    ("logprobs-negative", completion(logprobs=-1), "logprobs"),
    ("best-of-not-n", completion(best_of=2), "best_of"),
    ("best-of-not-n-explicit", completion(best_of=2, n=3), "best_of"),
    ("best-of-zero", completion(best_of=0), "best_of"),
    ("suffix", completion(suffix="end"), "suffix"),
    ("max-tokens-zero", completion(max_tokens=0), "max_tokens"),
    ("messages", completion(messages=[USER]), "messages"),
    (
        "stream-options-no-stream",
        completion(stream_options={"include_usage": True}),
        "stream_options",
    ),
    ("temperature-high", completion(temperature=3), "temperature"),
    ("stop-too-many", completion(stop=["x"] * 17), "stop"),
    ("top-logprobs-chat-only", completion(top_logprobs=2), "top_logprobs"),
]

TOKENIZE_CASES: list[tuple[str, object, str | None]] = [
    ("not-object", "x", None),
    ("empty", {}, "prompt"),
    ("prompt-int", {"prompt": 1}, "prompt"),
    ("prompt-list", {"prompt": ["a"]}, "prompt"),
    ("messages-empty", {"messages": []}, "messages"),
    ("messages-bad-role", {"messages": [{"role": "x", "content": "a"}]}, "messages.0.role"),
    ("both", {"prompt": "a", "messages": [USER]}, "prompt"),
    ("add-special-tokens-str", {"prompt": "a", "add_special_tokens": "y"}, "add_special_tokens"),
    (
        "add-generation-prompt-int",
        {"messages": [USER], "add_generation_prompt": 1},
        "add_generation_prompt",
    ),
    (
        "add-generation-prompt-with-prompt",
        {"prompt": "a", "add_generation_prompt": True},
        "add_generation_prompt",
    ),
    ("unknown", {"prompt": "a", "foo": 1}, "foo"),
    ("model-int", {"prompt": "a", "model": 1}, "model"),
]

DETOKENIZE_CASES: list[tuple[str, object, str | None]] = [
    ("not-object", 5, None),
    ("empty", {}, "tokens"),
    ("tokens-str", {"tokens": "1 2"}, "tokens"),
    ("tokens-negative", {"tokens": [1, -1]}, "tokens.1"),
    ("tokens-float", {"tokens": [1.0]}, "tokens.0"),
    ("tokens-nested", {"tokens": [[1]]}, "tokens.0"),
    ("unknown", {"tokens": [1], "skip_special_tokens": True}, "skip_special_tokens"),
]

Parser = Callable[[object], object]
ALL_CASES: list[tuple[Parser, str, object, str | None]] = [
    *((parse_chat_request, *case) for case in CHAT_CASES + UNSUPPORTED_CHAT_CASES),
    *((parse_completion_request, *case) for case in COMPLETION_CASES),
    *((parse_tokenize_request, *case) for case in TOKENIZE_CASES),
    *((parse_detokenize_request, *case) for case in DETOKENIZE_CASES),
]


@pytest.mark.parametrize(
    ("parse", "body", "param"),
    [
        pytest.param(p, body, param, id=f"{p.__name__.split('_')[1]}-{case_id}")
        for p, case_id, body, param in ALL_CASES
    ],
)
def test_bad_body_names_the_param(parse: Parser, body: object, param: str | None) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse(body)
    error = info.value
    assert error.param == param
    assert error.status == 400
    assert error.type == "invalid_request_error"
    if param is not None:
        assert f"'{param}'" in error.message  # the message names the field too
    envelope = error.to_dict()["error"]
    assert isinstance(envelope, dict)
    assert envelope["param"] == param


def test_case_ids_are_unique() -> None:
    for cases in (
        CHAT_CASES + UNSUPPORTED_CHAT_CASES,
        COMPLETION_CASES,
        TOKENIZE_CASES,
        DETOKENIZE_CASES,
    ):
        ids = [case_id for case_id, _, _ in cases]
        assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (chat(temprature=1), "unknown_parameter"),
        (chat(model=DROP), "missing_required_parameter"),
        (msgs({"role": "user"}), "missing_required_parameter"),
        (chat(store=True), "unsupported_parameter"),
        (chat(temperature=5), None),
    ],
)
def test_error_codes(body: object, code: str | None) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_chat_request(body)
    assert info.value.code == code


def test_messages_say_what_was_expected() -> None:
    with pytest.raises(InvalidRequestError, match="expected integer or null, got string"):
        parse_chat_request(chat(max_tokens="1"))
    with pytest.raises(InvalidRequestError, match="must be <= 2"):
        parse_chat_request(chat(temperature=2.5))
    with pytest.raises(InvalidRequestError, match=r"'image_url'.*expected one of 'text'"):
        parse_chat_request(msgs({"role": "user", "content": [{"type": "image_url"}]}))
    with pytest.raises(InvalidRequestError, match="an array of arrays of integers"):
        parse_completion_request(completion(prompt=[1, "a"]))
    with pytest.raises(InvalidRequestError, match="use tools"):
        parse_chat_request(chat(functions=[]))
    with pytest.raises(InvalidRequestError, match="unknown field 'temprature'"):
        parse_chat_request(chat(temprature=1))


def test_first_bad_message_is_reported() -> None:
    body = msgs(USER, USER, {"role": "user", "content": 1}, {"role": "user", "content": 2})
    with pytest.raises(InvalidRequestError) as info:
        parse_chat_request(body)
    assert info.value.param == "messages.2.content"


def test_parse_does_not_mutate_the_body() -> None:
    body = chat(store=False, service_tier="auto", temperature=0.5)
    snapshot = copy.deepcopy(body)
    parse_chat_request(body)
    assert body == snapshot


# --- the published request schemas agree with the parser --------------------------------------

# Rules JSON Schema does not express here (the parser still enforces them): rules across fields,
# "only the default value" for unsupported OpenAI fields, 1.0 as an integer (JSON Schema calls it
# one), NaN (not JSON), and a JSON Schema encoded in a string.
SCHEMA_CANNOT_SAY = {
    "chat": {
        "assistant-no-content",
        "assistant-null-content",
        "max-tokens-integral-float",
        "temperature-nan",
        "top-logprobs-without-logprobs",
        "top-logprobs-logprobs-false",
        "stream-options-no-stream",
        "stream-options-stream-false",
        "json-object-schema-not-json",
        "json-object-schema-not-object",
        "tool-choice-required-no-tools",
        "tool-choice-named-no-tools",
        "tool-choice-named-missing",
        "guided-two",
        "structured-outputs-none-set",
        "template-kwargs-reserved",
        *(case_id for case_id, _, _ in UNSUPPORTED_CHAT_CASES),
    },
    "completion": {
        "prompt-float-ids",
        "best-of-not-n",
        "best-of-not-n-explicit",
        "suffix",
        "stream-options-no-stream",
    },
    "tokenize": set(),
    "detokenize": {"tokens-float"},
}


def _request_validator(kind: str) -> Any:
    import jsonschema

    from mlctrio.protocol.openapi import openapi_document

    document = openapi_document()
    path = {
        "chat": "/v1/chat/completions",
        "completion": "/v1/completions",
        "tokenize": "/tokenize",
        "detokenize": "/detokenize",
    }[kind]
    schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    return jsonschema.Draft202012Validator(
        {**schema["schema"], "components": document["components"]}
    )


@pytest.mark.parametrize(
    ("kind", "cases"),
    [
        ("chat", CHAT_CASES + UNSUPPORTED_CHAT_CASES),
        ("completion", COMPLETION_CASES),
        ("tokenize", TOKENIZE_CASES),
        ("detokenize", DETOKENIZE_CASES),
    ],
)
def test_request_schema_rejects_what_the_parser_rejects(
    kind: str, cases: list[tuple[str, object, str | None]]
) -> None:
    validator = _request_validator(kind)
    accepted_by_schema = {case_id for case_id, body, _ in cases if validator.is_valid(body)}
    assert accepted_by_schema == SCHEMA_CANNOT_SAY[kind]
