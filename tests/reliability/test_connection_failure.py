"""One connection's failure inside Hypercorn ends that connection only, never the server.

Hypercorn 0.18's trio server let an exception from one connection's handling escape into the
server's nursery, ending every connection and the process (seen with sglang-router's HTTP/2
probe: a KeyError for a stream h2 had already dropped). mlctrio/hypercorn_patches.py contains it.
Here the failure is injected into Hypercorn's HTTP/1.1 protocol for one connection.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from hypercorn.events import RawData
from hypercorn.protocol import h11

from tests.server import conftest as _servers
from tests.server.conftest import ServerHandle

server_factory = _servers.server_factory  # the shared fixture (tests/server/conftest.py)

POISON = b"POISON /x HTTP/1.1\r\n\r\n"


def test_a_failing_connection_is_closed_and_the_server_keeps_serving(
    server_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle: ServerHandle = server_factory()
    original = h11.H11Protocol.handle

    async def handle_or_fail(self: Any, event: Any) -> None:
        if isinstance(event, RawData) and event.data.startswith(b"POISON"):
            raise KeyError(1)  # what h2 raised for a stream it had already dropped
        await original(self, event)

    monkeypatch.setattr(h11.H11Protocol, "handle", handle_or_fail)
    host, port = handle.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(POISON)
        assert sock.recv(1024) == b""  # that connection is closed, without an answer
    with handle.client() as client:  # and the server still serves
        assert client.get("/health").status_code == 200
        reply = client.post(
            "/v1/completions", json={"model": "mock://echo", "prompt": "ok", "max_tokens": 2}
        )
    assert reply.status_code == 200
    assert handle.error is None
