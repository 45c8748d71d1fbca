"""A full queue refuses a stream before any byte; a stream that got its 200 ends with [DONE]."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import trio

from mlctrio.engine.types import GenerationRequest, SamplingParams
from mlctrio.errors import QueueFullError
from mlctrio.service import AsyncEngine, EngineState
from tests.server import conftest as _servers
from tests.server.conftest import ServerHandle

# The shared server fixtures (tests/server/conftest.py) serve these tests too.
server = _servers.server
server_factory = _servers.server_factory


def _stream(handle: ServerHandle, i: int, results: list[tuple[int, bytes]]) -> None:
    body = {
        "model": "mock://echo",
        "messages": [{"role": "user", "content": f"{i} " + "q" * 40}],
        "stream": True,
    }
    with httpx.Client(base_url=handle.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as reply:
            results.append((reply.status_code, reply.read()))


def test_concurrent_streams_are_refused_whole_or_served_whole(server_factory) -> None:  # type: ignore[no-untyped-def]
    handle = server_factory(
        model="mock://echo?delay_ms=10&max_num_sequence=2", max_queued_requests=4
    )
    results: list[tuple[int, bytes]] = []
    threads = [threading.Thread(target=_stream, args=(handle, i, results)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 40
    served = [body for status, body in results if status == 200]
    refused = [(status, body) for status, body in results if status != 200]
    assert served and refused
    for body in served:
        assert body.endswith(b"data: [DONE]\n\n"), body[-200:]
        assert b'"error"' not in body
    for status, body in refused:
        assert status == 503
        assert json.loads(body)["error"]["code"] == "queue_full"
    handle.wait_quiescent()


def _request(i: int) -> GenerationRequest:
    return GenerationRequest(f"r{i}", (1, 2, 3), SamplingParams(max_tokens=4))


def test_submit_decides_admission_and_submits_in_one_step() -> None:
    engine = AsyncEngine(2, lambda: (None, None))  # type: ignore[arg-type,return-value]
    engine.state = EngineState.READY

    async def main() -> None:
        first = engine.submit([_request(0), _request(1)])
        with pytest.raises(QueueFullError):
            engine.submit([_request(2)])
        assert engine.num_queued == 2  # the refused request left nothing behind
        first.close()
        assert first.unfinished == set()

    trio.run(main)
