"""The engine worker dying: /health says failed, open requests end with an error, new ones get
503, the failure is logged once, and the server keeps answering."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import httpx
import pytest

import mlctrio.serve
from mlctrio.loader import core_factory
from tests.server import conftest as _servers
from tests.server.conftest import ServerHandle

# The shared server fixtures (tests/server/conftest.py) serve these tests too.
server = _servers.server
server_factory = _servers.server_factory


class _DyingCore:
    """The echo core, whose step() raises once `die` is set."""

    def __init__(self, core: Any, die: threading.Event) -> None:
        self._core = core
        self._die = die

    def step(self) -> Any:
        if self._die.is_set():
            raise RuntimeError("boom in step")
        return self._core.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)


@pytest.fixture
def dying(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    die = threading.Event()

    def factory(config: Any) -> Any:
        inner = core_factory(config)

        def make() -> Any:
            core, info = inner()
            return _DyingCore(core, die), info

        return make

    monkeypatch.setattr(mlctrio.serve, "core_factory", factory)
    return die


def _chat(stream: bool) -> dict[str, Any]:
    return {
        "model": "mock://echo",
        "messages": [{"role": "user", "content": "x" * 3000}],
        "stream": stream,
    }


def test_worker_death_fails_open_requests_and_the_server_says_so(
    server_factory, dying: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    handle: ServerHandle = server_factory(model="mock://echo?delay_ms=10")
    caplog.set_level(logging.INFO, logger="mlctrio")
    results: dict[str, Any] = {}

    def non_streaming() -> None:
        with handle.client() as http:
            results["plain"] = http.post("/v1/chat/completions", json=_chat(False))

    plain = threading.Thread(target=non_streaming)
    with httpx.Client(base_url=handle.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=_chat(True)) as reply:
            assert reply.status_code == 200
            lines = reply.iter_lines()
            assert next(lines).startswith("data: ")  # streaming
            plain.start()
            handle.wait_until(lambda: handle.engine.num_in_flight == 2)
            dying.set()
            rest = [line for line in lines if line]
        plain.join(30)
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))
        assert error["error"]["code"] == "engine_error"
        assert results["plain"].status_code == 500
        assert results["plain"].json()["error"]["type"] == "server_error"

        health = http.get("/health")
        assert (health.status_code, health.json()) == (503, {"status": "failed"})
        refused = http.post("/v1/chat/completions", json=_chat(False))
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "engine_failed"
        assert http.get("/v1/models").status_code == 200  # the server itself lives on
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    assert "boom in step" in failures[0].getMessage()
    assert failures[0].exc_info is None  # one line; the traceback is at debug level
