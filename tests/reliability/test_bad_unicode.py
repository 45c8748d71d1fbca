"""An unpaired UTF-16 surrogate escape (valid JSON, invalid Unicode) is a 400 naming where it is,
never a 500 from the tokenizer; a valid surrogate pair (an emoji written as two escapes) is text."""

from __future__ import annotations

import pytest

from mlctrio.server.state import lone_surrogate_path
from tests.server import conftest as _servers
from tests.server.conftest import ServerHandle

server = _servers.server  # the shared server fixture (tests/server/conftest.py), mock://echo

CHAT = '{"model": "mock://echo", "max_tokens": 4, "messages": [{"role": "user", "content": "@"}]}'
CMPL = '{"model": "mock://echo", "max_tokens": 4, "prompt": "@"}'
TOKENIZE = '{"prompt": "@"}'


@pytest.mark.parametrize(
    ("path", "template", "param"),
    [
        ("/v1/chat/completions", CHAT, "messages.0.content"),
        ("/v1/completions", CMPL, "prompt"),
        ("/tokenize", TOKENIZE, "prompt"),
    ],
)
@pytest.mark.parametrize("escape", [r"\ud800", r"\uDFFF", r"\ud83d x", r"x \ude00"])
def test_unpaired_surrogate_is_a_400(
    server: ServerHandle, path: str, template: str, param: str, escape: str
) -> None:
    body = template.replace("@", f"hi {escape} there")
    with server.client() as client:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_unicode"
    assert error["param"] == param


@pytest.mark.parametrize(
    ("path", "template"),
    [("/v1/chat/completions", CHAT), ("/v1/completions", CMPL), ("/tokenize", TOKENIZE)],
)
def test_a_surrogate_pair_is_ordinary_text(server: ServerHandle, path: str, template: str) -> None:
    body = template.replace("@", r"smile \ud83d\ude00 ok")
    with server.client() as client:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_the_path_names_keys_and_list_items() -> None:
    assert lone_surrogate_path({"a": ["ok", {"b": "x\ud800"}]}) == "a.1.b"
    assert lone_surrogate_path({"k\udc00": 1}) == "k\udc00"
    assert lone_surrogate_path("\udfff") == "body"
    assert lone_surrogate_path({"a": ["\U0001f600", 3, None]}) is None
