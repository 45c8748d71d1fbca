"""Abort reasons end to end: a client leaving mid-stream is a client_disconnect, never an error."""

from __future__ import annotations

import pytest

from mlctrio.service import AbortReason, abort_reason_for
from tests.server import conftest as _servers
from tests.server.conftest import ServerHandle, metric_total, raw_chat_post

# The shared server fixtures (tests/server/conftest.py) serve these tests too.
server = _servers.server
server_factory = _servers.server_factory


def _aborted(handle: ServerHandle, reason: str) -> float:
    with handle.client() as http:
        text = http.get("/metrics").text
    return metric_total(text, "mlctrio_requests_aborted_total", reason=reason)


def test_reason_of_how_a_block_ended() -> None:
    assert abort_reason_for(GeneratorExit()) is AbortReason.CLIENT_DISCONNECT
    assert abort_reason_for(ValueError("x")) is AbortReason.ERROR
    group = BaseExceptionGroup("g", [GeneratorExit(), ValueError("x")])
    assert abort_reason_for(group) is AbortReason.ERROR


def test_disconnect_storm_counts_client_disconnects_only(server_factory) -> None:  # type: ignore[no-untyped-def]
    handle = server_factory(model="mock://echo?delay_ms=5&max_num_sequence=16")
    sockets = []
    for i in range(20):
        body = {
            "model": "mock://echo",
            "messages": [{"role": "user", "content": f"{i} " + "s" * 2000}],
            "stream": True,
        }
        sockets.append(raw_chat_post(handle, body))
    for sock in sockets:
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")  # the stream is under way
    for sock in sockets:
        sock.close()
    handle.wait_quiescent(timeout_s=30)
    handle.wait_until(lambda: _aborted(handle, "client_disconnect") == 20)
    assert _aborted(handle, "error") == 0


@pytest.mark.parametrize("stream", [True, False])
def test_deadline_is_a_timeout(server_factory, stream: bool) -> None:  # type: ignore[no-untyped-def]
    handle = server_factory(model="mock://echo?delay_ms=20", request_timeout_s=0.3)
    body = {"model": "mock://echo", "messages": [{"role": "user", "content": "t" * 500}]}
    with handle.client() as http:
        reply = http.post("/v1/chat/completions", json={**body, "stream": stream})
    if stream:
        assert reply.text.endswith("data: [DONE]\n\n") and "request_timeout" in reply.text
    else:
        assert reply.status_code == 504
    handle.wait_until(lambda: _aborted(handle, "timeout") == 1)
    assert _aborted(handle, "client_disconnect") == 0 and _aborted(handle, "error") == 0


def test_unknown_reason_strings_are_refused() -> None:
    with pytest.raises(ValueError):
        AbortReason("bogus")
    assert AbortReason("client_disconnect") is AbortReason.CLIENT_DISCONNECT
