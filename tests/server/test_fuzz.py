"""No client input ever gets a 500 or a traceback: random bodies against the live server."""

from __future__ import annotations

from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import ServerHandle

MODEL = "mock://echo"
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
CHAT_FIELDS = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "user",
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "stop_token_ids",
]
COMPLETION_FIELDS = [
    "model",
    "prompt",
    "max_tokens",
    "n",
    "echo",
    "logprobs",
    "best_of",
    "suffix",
    "stop",
    "stream",
    "seed",
    "logit_bias",
    "temperature",
]


def _check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(CHAT_FIELDS), value=JSON, extra=st.sampled_from(CHAT_FIELDS), v2=JSON)
def test_chat_mutations(server: ServerHandle, field: str, value: Any, extra: str, v2: Any) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "fuzz"}],
        "max_tokens": 4,
    }
    body[field] = value
    body[extra] = v2
    with server.client() as http:
        _check(http.post("/v1/chat/completions", json=body))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(COMPLETION_FIELDS), value=JSON)
def test_completion_mutations(server: ServerHandle, field: str, value: Any) -> None:
    body: dict[str, Any] = {"model": MODEL, "prompt": "fuzz", "max_tokens": 4}
    body[field] = value
    with server.client() as http:
        _check(http.post("/v1/completions", json=body))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/tokenize", "/detokenize", "/v1/chat/completions"]), body=JSON)
def test_any_json_body(server: ServerHandle, path: str, body: Any) -> None:
    with server.client() as http:
        _check(http.post(path, json=body))


def test_non_standard_json_numbers(server: ServerHandle) -> None:
    """Python's json module accepts NaN/Infinity; they must still be refused cleanly."""
    for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
        body = (
            '{"model": "mock://echo", "messages": [{"role": "user", "content": "x"}], '
            f'"temperature": {literal}}}'
        )
        with server.client() as http:
            response = http.post(
                "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
            )
        assert response.status_code == 400, (literal, response.text)
        assert response.json()["error"]["param"] == "temperature"
