"""The JSON of every error case, and that no client input ever produces a 500."""

from __future__ import annotations

import json

import pytest

from .conftest import ServerHandle

MODEL = "mock://echo"
CHAT = "/v1/chat/completions"


def _post(server: ServerHandle, path: str, body: object, **kwargs: object):  # type: ignore[no-untyped-def]
    with server.client() as http:
        if isinstance(body, (bytes, str)):
            return http.post(path, content=body, **kwargs)  # type: ignore[arg-type]
        return http.post(path, json=body, **kwargs)  # type: ignore[arg-type]


def _msg(text: str = "hi") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


CASES = [
    # (path, body, status, type, code, param)
    (
        CHAT,
        {"model": "other", "messages": _msg()},
        404,
        "invalid_request_error",
        "model_not_found",
        "model",
    ),
    (CHAT, {"messages": _msg()}, 400, "invalid_request_error", None, "model"),
    (CHAT, {"model": MODEL}, 400, "invalid_request_error", None, "messages"),
    (
        CHAT,
        {"model": MODEL, "messages": _msg(), "temperature": 2.5},
        400,
        "invalid_request_error",
        None,
        "temperature",
    ),
    (
        CHAT,
        {"model": MODEL, "messages": _msg(), "temperature": "hot"},
        400,
        "invalid_request_error",
        None,
        "temperature",
    ),
    (CHAT, {"model": MODEL, "messages": _msg(), "n": 0}, 400, "invalid_request_error", None, "n"),
    (
        CHAT,
        {"model": MODEL, "messages": _msg(), "max_tokens": "5"},
        400,
        "invalid_request_error",
        None,
        "max_tokens",
    ),
    (
        CHAT,
        {"model": MODEL, "messages": _msg(), "bogus_field": 1},
        400,
        "invalid_request_error",
        None,
        "bogus_field",
    ),
    (
        CHAT,
        {"model": MODEL, "messages": _msg(), "top_logprobs": 3},
        400,
        "invalid_request_error",
        None,
        "top_logprobs",
    ),
    (
        CHAT,
        {"model": MODEL, "messages": _msg(), "logit_bias": {"999999": 5}},
        400,
        "invalid_request_error",
        None,
        "logit_bias",
    ),
    (
        CHAT,
        {"model": MODEL, "messages": _msg(), "stream_options": {"include_usage": True}},
        400,
        "invalid_request_error",
        None,
        "stream_options",
    ),
    (
        CHAT,
        {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "invalid_request_error",
        None,
        "messages.0.role",
    ),
    (
        CHAT,
        {"model": MODEL, "messages": _msg("x" * 5000)},
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    ),
    (
        CHAT,
        {"model": MODEL, "messages": _msg(), "max_tokens": 5000},
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "max_tokens",
    ),
    (
        CHAT,
        {"model": MODEL, "messages": _msg(), "response_format": {"type": "json_object"}},
        400,
        "invalid_request_error",
        None,
        "response_format",
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "suffix": "y"},
        400,
        "invalid_request_error",
        "unsupported_parameter",
        "suffix",
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "x" * 5000},
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "prompt",
    ),
    (
        CHAT,
        {"model": MODEL, "messages": _msg(), "max_tokens": 5000, "max_completion_tokens": 6000},
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "max_tokens",
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": [999999]},
        400,
        "invalid_request_error",
        None,
        "prompt",
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "logprobs": 6},
        400,
        "invalid_request_error",
        None,
        "logprobs",
    ),
    ("/detokenize", {"tokens": [10**9]}, 400, "invalid_request_error", None, "tokens.0"),
]


@pytest.mark.parametrize(("path", "body", "status", "type_", "code", "param"), CASES)
def test_error_envelope(server: ServerHandle, path, body, status, type_, code, param) -> None:  # type: ignore[no-untyped-def]
    response = _post(server, path, body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text


def test_malformed_json_and_content_type(server: ServerHandle) -> None:
    bad = _post(server, CHAT, b'{"model": ', headers={"content-type": "application/json"})
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_json"
    wrong = _post(server, CHAT, b"model=x", headers={"content-type": "text/plain"})
    assert wrong.status_code == 400
    assert wrong.json()["error"]["code"] == "invalid_content_type"
    not_object = _post(server, CHAT, [1, 2, 3])
    assert not_object.status_code == 400
    assert not_object.json()["error"]["type"] == "invalid_request_error"


def test_body_too_large_is_413(server_factory) -> None:  # type: ignore[no-untyped-def]
    handle = server_factory(max_body_bytes=1000)
    response = _post(handle, CHAT, {"model": MODEL, "messages": _msg("x" * 2000)})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_unknown_route_and_method(server: ServerHandle) -> None:
    with server.client() as http:
        missing = http.get("/v1/nothing")
        assert missing.status_code == 404
        assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
        method = http.get(CHAT)
        assert method.status_code == 405
        assert method.json()["error"]["code"] == "method_not_allowed"
        model = http.get("/v1/models/not-here")
        assert model.status_code == 404
        assert model.json()["error"]["code"] == "model_not_found"


def test_api_key_errors(server_factory) -> None:  # type: ignore[no-untyped-def]
    handle = server_factory(api_keys=("k1", "k2"))
    with handle.client() as http:
        missing = http.get("/v1/models")
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
        wrong = http.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.json()["error"] == {
            "message": "Incorrect API key provided.",
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
        assert http.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
        assert http.get("/health").status_code == 200  # open route
        assert http.get("/metrics").status_code == 401


def test_request_ids_are_server_generated(server: ServerHandle) -> None:
    body = {"model": MODEL, "messages": _msg(), "user": "chatcmpl-mine"}
    first = _post(server, CHAT, body).json()["id"]
    second = _post(server, CHAT, body).json()["id"]
    assert first != second
    assert "mine" not in first


def test_error_after_stream_started_is_an_error_event(server_factory) -> None:  # type: ignore[no-untyped-def]
    handle = server_factory(model="mock://echo?delay_ms=20", request_timeout_s=0.3)
    with (
        handle.client() as http,
        http.stream(
            "POST", CHAT, json={"model": MODEL, "messages": _msg("z" * 200), "stream": True}
        ) as response,
    ):
        raw = b"".join(response.iter_raw())
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    error = json.loads(events[-2][len(b"data: ") :])
    assert error["error"]["code"] == "request_timeout"
    assert set(error["error"]) == {"message", "type", "param", "code"}
    handle.wait_quiescent()
    # Non-streaming: 504 with the envelope.
    response = _post(handle, CHAT, {"model": MODEL, "messages": _msg("z" * 200)})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "request_timeout"
    handle.wait_quiescent()


@pytest.mark.parametrize("stream", [False, True])
def test_engine_limits_are_400_before_any_stream(server_factory, stream: bool) -> None:  # type: ignore[no-untyped-def]
    handle = server_factory(model="mock://echo?max_num_sequence=4&num_pages=8")
    too_many = _post(handle, CHAT, {"model": MODEL, "messages": _msg(), "n": 6, "stream": stream})
    assert too_many.status_code == 400
    assert too_many.json()["error"]["param"] == "n"
    assert too_many.json()["error"]["code"] == "too_many_choices"
    # 8 pages of 16 tokens: a 200-token prompt fits the window (4096) but never the KV cache.
    too_big = _post(handle, CHAT, {"model": MODEL, "messages": _msg("k" * 200), "stream": stream})
    assert too_big.status_code == 400
    assert too_big.json()["error"]["code"] == "context_length_exceeded"
    handle.wait_quiescent()
