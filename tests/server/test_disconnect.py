"""A client that goes away aborts its request in every phase; nothing stays allocated.

The echo fake's KV-page accounting is real (the scheduler's page pool mirrors the runner's), so
"zero running, zero waiting, every page free" after each scenario is a real statement.
"""

from __future__ import annotations

import time

import pytest

from .conftest import ServerHandle, metric_total, raw_chat_post

MODEL = "mock://echo"


def _raw_request(  # type: ignore[no-untyped-def]
    handle: ServerHandle, text: str, stream: bool, max_tokens: int | None = None
):
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return raw_chat_post(handle, body)


def _aborted(handle: ServerHandle) -> float:
    with handle.client() as http:
        text = http.get("/metrics").text
    return metric_total(text, "mlctrio_requests_aborted_total", reason="client_disconnect")


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_while_decoding(server_factory, stream: bool) -> None:  # type: ignore[no-untyped-def]
    handle = server_factory(model="mock://echo?delay_ms=10")
    before = _aborted(handle)
    sock = _raw_request(handle, "d" * 1000, stream)
    handle.wait_until(lambda: handle.core_stats().num_running == 1)
    handle.wait_until(lambda: handle.core_stats().free_pages < handle.core_stats().total_pages)
    sock.close()
    handle.wait_quiescent()
    handle.wait_until(lambda: _aborted(handle) == before + 1)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_while_queued(server_factory, stream: bool) -> None:  # type: ignore[no-untyped-def]
    handle = server_factory(model="mock://echo?delay_ms=10&max_num_sequence=1")
    blocker = _raw_request(handle, "b" * 300, True)
    handle.wait_until(lambda: handle.core_stats().num_running == 1)
    queued = _raw_request(handle, "q" * 300, stream)
    handle.wait_until(lambda: handle.core_stats().num_waiting == 1)
    queued.close()
    handle.wait_until(lambda: handle.core_stats().num_waiting == 0)
    assert handle.engine.num_in_flight == 1  # only the blocker is left
    blocker.close()
    handle.wait_quiescent()


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_during_prefill(server_factory, stream: bool) -> None:  # type: ignore[no-untyped-def]
    # A 3000-token prompt in 16-token chunks at 20 ms a step takes ~4 s to prefill.
    handle = server_factory(
        model="mock://echo?delay_ms=20",
        overrides=__import__("mlctrio.config", fromlist=["EngineOverrides"]).EngineOverrides(
            prefill_chunk_size=16
        ),
    )
    sock = _raw_request(handle, "p" * 3000, stream, max_tokens=10)

    def pages_in_use() -> int:
        stats = handle.core_stats()
        return int(stats.total_pages - stats.free_pages)

    handle.wait_until(lambda: pages_in_use() > 0)
    first = pages_in_use()
    handle.wait_until(lambda: pages_in_use() > first)  # prefill is under way, chunk by chunk
    # Still in prefill: nothing generated yet.
    assert handle.core_stats().num_generation_tokens_total == 0
    sock.close()
    handle.wait_quiescent()


def test_many_clients_disconnecting_at_random_points(server_factory) -> None:  # type: ignore[no-untyped-def]
    import random

    handle = server_factory(model="mock://echo?delay_ms=2&max_num_sequence=8")
    rng = random.Random(7)
    sockets = []
    for i in range(40):
        sockets.append(
            _raw_request(handle, f"{i}-" + "m" * rng.randint(10, 400), rng.random() < 0.7)
        )
    for sock in sockets:
        time.sleep(rng.random() * 0.02)
        if rng.random() < 0.5:
            sock.recv(rng.randint(1, 4096))
        sock.close()
    handle.wait_quiescent(timeout_s=30)
    # The server is still healthy and serves new requests correctly.
    with handle.client() as http:
        reply = http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "after"}]},
        )
    assert reply.json()["choices"][0]["message"]["content"] == "after"
    handle.wait_quiescent()
