"""Raw SSE bytes, checked byte for byte against what OpenAI sends."""

from __future__ import annotations

import json

from .conftest import ServerHandle

MODEL = "mock://echo"


def _dump(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _raw(server: ServerHandle, path: str, body: dict) -> bytes:  # type: ignore[type-arg]
    with server.client() as http, http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return b"".join(response.iter_raw())


def test_chat_stream_bytes(server: ServerHandle) -> None:
    raw = _raw(
        server,
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hé"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    first = json.loads(raw.split(b"\n\n")[0][len(b"data: ") :])
    head = {
        "id": first["id"],
        "object": "chat.completion.chunk",
        "created": first["created"],
        "model": MODEL,
        "system_fingerprint": first["system_fingerprint"],
    }

    def chunk(delta: dict, finish: str | None = None) -> bytes:  # type: ignore[type-arg]
        body = dict(head)
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        body["usage"] = None
        return b"data: " + _dump(body) + b"\n\n"

    usage = dict(head)
    usage["choices"] = []
    prompt_tokens = len("hé".encode())
    usage["usage"] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 4,  # h, the two bytes of é, EOS
        "total_tokens": prompt_tokens + 4,
    }
    # "é" is two bytes/tokens: it must arrive whole, in one chunk, never split.
    expected = (
        chunk({"role": "assistant", "content": ""})
        + chunk({"content": "h"})
        + chunk({"content": "é"})
        + chunk({}, "stop")
        + b"data: "
        + _dump(usage)
        + b"\n\n"
        + b"data: [DONE]\n\n"
    )
    assert raw == expected


def test_completion_stream_bytes(server: ServerHandle) -> None:
    raw = _raw(
        server,
        "/v1/completions",
        {"model": MODEL, "prompt": "ok", "stream": True, "max_tokens": 2},
    )
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    first = json.loads(events[0][len(b"data: ") :])
    head = {
        "id": first["id"],
        "object": "text_completion",
        "created": first["created"],
        "model": MODEL,
        "system_fingerprint": first["system_fingerprint"],
    }

    def chunk(text: str, finish: str | None) -> bytes:
        body = dict(head)
        body["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
        return b"data: " + _dump(body) + b"\n\n"

    assert raw == chunk("o", None) + chunk("k", "length") + b"data: [DONE]\n\n"
    assert first["id"].startswith("cmpl-")


def test_keepalive_pings_while_queued(server_factory) -> None:  # type: ignore[no-untyped-def]
    handle = server_factory(
        model="mock://echo?delay_ms=30&max_num_sequence=1", ping_interval_s=0.05
    )
    url = "/v1/chat/completions"
    # A blocker that would run for a minute: it holds the only sequence slot until its client
    # goes away, which this test decides (no race with its natural end on a slow machine).
    long = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 2000}], "stream": True}
    short = {"model": MODEL, "messages": [{"role": "user", "content": "y"}], "stream": True}
    raw = b""
    with handle.client() as http, handle.client() as http2:
        with http.stream("POST", url, json=long) as blocker:
            blocker_bytes = blocker.iter_raw()
            next(blocker_bytes)  # the blocker is running
            with http2.stream("POST", url, json=short) as queued:
                assert queued.status_code == 200
                queued_bytes = queued.iter_raw()
                for chunk in queued_bytes:  # until a ping arrives (or the stream ends)
                    raw += chunk
                    if b": ping" in raw:
                        break
                blocker.close()  # the blocker's client disconnects: the slot frees
                raw += b"".join(queued_bytes)
    events = raw.split(b"\n\n")
    # The role chunk first, then pings while the blocker holds the only sequence slot,
    # then the content; pings are SSE comments, invisible to clients.
    assert events[0].startswith(b"data: ")
    assert b": ping" in events[1:3]
    assert events[-2] == b"data: [DONE]"
    assert b'"content":"y"' in raw
