"""`--speculative-mode ngram` on the echo model through HTTP: the same answers as without it,
streamed or not, and the drafts counted on /metrics (the fast tier; the real model's turn is
test_speculative_real.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from mlctrio.config import EngineOverrides

from .conftest import ServerHandle, make_config, start_server

PROMPT = "one two three, one two three, one two three, and four: one two three four."


@pytest.fixture(scope="module")
def ngram_server() -> Iterator[ServerHandle]:
    handle = start_server(
        make_config(
            speculative_mode="ngram",
            overrides=EngineOverrides(spec_draft_length=4),
            enable_debug=True,
            enable_tracing=True,
        )
    )
    yield handle
    handle.stop()


def _chat(url: str, stream: bool) -> str:
    body = {
        "model": "mock://echo",
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": stream,
        "max_tokens": 200,
    }
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200
    if not stream:
        return str(r.json()["choices"][0]["message"]["content"])
    assert r.text.rstrip().endswith("data: [DONE]")
    return "".join(re.findall(r'"content":"((?:[^"\\]|\\.)*)"', r.text))  # the deltas, in order


@pytest.mark.parametrize("stream", [False, True])
def test_answers_as_without_drafts(
    server: ServerHandle, ngram_server: ServerHandle, stream: bool
) -> None:
    assert _chat(ngram_server.url, stream) == _chat(server.url, stream)
    assert PROMPT in _chat(ngram_server.url, stream)


def test_metrics_count_the_drafts(ngram_server: ServerHandle) -> None:
    _chat(ngram_server.url, False)
    text = httpx.get(ngram_server.url + "/metrics", timeout=30).text
    drafted = re.search(
        r'^mlctrio_spec_decode_num_draft_tokens_total\{[^}]*mode="ngram"[^}]*\} (\S+)$',
        text,
        re.MULTILINE,
    )
    accepted = re.search(
        r'^mlctrio_spec_decode_num_accepted_tokens_total\{[^}]*mode="ngram"[^}]*\} (\S+)$',
        text,
        re.MULTILINE,
    )
    assert drafted is not None and accepted is not None
    assert 0 < float(accepted.group(1)) <= float(drafted.group(1))


def test_the_trace_has_each_requests_accepted_length(ngram_server: ServerHandle) -> None:
    body = {"model": "mock://echo", "messages": [{"role": "user", "content": PROMPT}]}
    request_id = httpx.post(ngram_server.url + "/v1/chat/completions", json=body).json()["id"]
    events = httpx.post(ngram_server.url + "/debug/dump_event_trace").json()["traceEvents"]
    finished = [
        e for e in events
        if e["name"] == "finished" and e["args"].get("request_id") == request_id
    ]  # fmt: skip
    assert len(finished) == 1
    args = finished[0]["args"]
    assert 0 < args["spec_accepted_tokens"] <= args["spec_draft_tokens"]
    assert args["spec_drafts"] > 0
    assert args["spec_mean_accepted_length"] == pytest.approx(
        args["spec_accepted_tokens"] / args["spec_drafts"], abs=1e-3
    )
    steps = [
        e["args"]["tokens"] for e in events
        if e["name"] == "step" and e["args"].get("request_id") == request_id
    ]  # fmt: skip
    assert max(steps) > 1  # a step delivered several tokens
