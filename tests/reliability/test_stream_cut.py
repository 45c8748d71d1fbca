"""A stream cut off by the server after its 200 still ends with an error event and [DONE].

Under `hypercorn -k trio mlctrio.app:app`, Hypercorn cancels the connections still open when its
`--graceful-timeout` runs out, before the app's shutdown hook could abort their requests: the
stream used to stop mid-way with no error and no [DONE] (curl exit 18). server/asgi.py now ends
such a body with the epilogue its route registered.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable

import httpx

from .test_operator_paths import _env, _free_port, _hypercorn, _Proc, spawn

__all__ = ["spawn"]  # the fixture, shared with the operator-path tests


def _events(raw: bytes) -> list[str]:
    return [
        line.removeprefix("data: ")
        for line in raw.decode().splitlines()
        if line.startswith("data: ")
    ]


def test_a_stream_cut_at_hypercorns_graceful_timeout_ends_with_an_error_and_done(
    spawn: Callable[..., _Proc],
) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    p = spawn(
        _hypercorn(port, "--graceful-timeout", "1"),
        _env(MLCTRIO_MODEL="mock://echo?delay_ms=100"),
    )
    p.wait_for(r"INFO mlctrio: ready: serving")
    body = {"model": "mock://echo", "prompt": "x" * 200, "max_tokens": 200, "stream": True}
    raw = b""
    with httpx.Client(base_url=url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            chunks = response.iter_raw()
            raw += next(chunks)  # the stream is under way (200 tokens at 100 ms: 20 s)
            p.proc.send_signal(signal.SIGTERM)
            for chunk in chunks:
                raw += chunk
    events = _events(raw)
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["type"] == "service_unavailable"
    assert "stopped this stream" in error["message"]
    assert len(events) < 150  # cut well before its 200 tokens: the scenario really happened
    p.exit_code()
