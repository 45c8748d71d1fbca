"""Deeply nested JSON is a 400 wherever it sits in the body, never a 500."""

from __future__ import annotations

import pytest

from mlctrio.server.state import MAX_JSON_DEPTH, json_depth
from tests.server import conftest as _servers
from tests.server.conftest import ServerHandle

# The shared server fixtures (tests/server/conftest.py) serve these tests too.
server = _servers.server
server_factory = _servers.server_factory

MSGS = '[{"role":"user","content":"hi"}]'


def _schema(depth: int) -> str:
    return '{"type":"object","properties":{"a":' * depth + "{}" + "}}" * depth


def _array(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def _bodies(depth: int) -> dict[str, tuple[str, str]]:
    chat, cmpl = "/v1/chat/completions", "/v1/completions"
    return {
        "body": (chat, _array(depth)),
        "content": (chat, '{"messages":[{"role":"user","content":@}]}'.replace("@", _array(depth))),
        "tools": (
            chat,
            '{"model":"mock://echo","messages":@M,"tools":[{"type":"function","function":{"name":"f","parameters":@}}]}'.replace(
                "@M", MSGS
            ).replace("@", _schema(depth)),
        ),
        "response_format": (
            chat,
            (
                '{"model":"mock://echo","messages":@M,"response_format":{"type":"json_schema","json_schema":'
                '{"name":"x","schema":@}}}'
            )
            .replace("@M", MSGS)
            .replace("@", _schema(depth)),
        ),
        "prompt": (cmpl, '{"prompt":@}'.replace("@", _array(depth))),
        "tokenize": ("/tokenize", '{"prompt":@}'.replace("@", _array(depth))),
    }


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 5000, 200_000])
@pytest.mark.parametrize("place", sorted(_bodies(1)))
def test_too_deep_is_400(server: ServerHandle, place: str, depth: int) -> None:
    path, body = _bodies(depth)[place]
    with server.client() as http:
        reply = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text[:300]
    assert reply.json()["error"]["code"] == "json_too_deep"


def test_tools_nested_within_the_limit_are_served(server: ServerHandle) -> None:
    # tool_choice none: the mock model cannot constrain, but the schema still goes through
    # validation and the chat template.
    depth = MAX_JSON_DEPTH // 2 - 4
    body = (
        (
            '{"model":"mock://echo","messages":@M,"tool_choice":"none","tools":[{"type":"function","function":'
            '{"name":"f","parameters":@}}]}'
        )
        .replace("@M", MSGS)
        .replace("@", _schema(depth))
    )
    with server.client() as http:
        reply = http.post(
            "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
    assert reply.status_code == 200, reply.text[:300]


def test_json_depth_counts_nesting_without_recursion() -> None:
    value: object = 1
    for _ in range(100_000):
        value = [value]
    assert json_depth(value) == 100_000
    assert json_depth({"a": [1, {"b": []}], "c": 2}) == 4
    assert json_depth("scalar") == 0
