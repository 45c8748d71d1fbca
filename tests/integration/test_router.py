"""mlctrio behind sglang-router (the SGLang Model Gateway), unchanged: real processes end to end.

Two `mlctrio serve mock://echo` replicas (prefix cache on) and the router from the test extra.
The router rewrites every request (it adds SGLang's extension fields), so each 200 here also
proves mlctrio accepts what the router sends.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .cluster import MODEL, Cluster, wait_until

SYSTEM = "You are a careful assistant who answers in one short sentence. " * 20  # ~1.3k tokens


def chat(url: str, system: str, user: str, **extra: object) -> httpx.Response:
    body = {
        "model": MODEL,
        "max_tokens": 4,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        **extra,
    }
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("router"))
    try:
        c.start_replicas(2)
        c.start_router("cache_aware")
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()


def test_router_registers_replicas_by_model_name(cluster: Cluster) -> None:
    models = httpx.get(f"{cluster.url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    info = httpx.get(f"{cluster.replica_urls[0]}/server_info", timeout=10).json()
    assert info["served_model_name"] == MODEL and info["dp_size"] == 1
    load = httpx.get(f"{cluster.replica_urls[0]}/get_load", timeout=10).json()
    assert load == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]


def test_shared_prefix_stays_on_the_replica_that_cached_it(cluster: Cluster) -> None:
    before = cluster.served()
    first = chat(cluster.url, SYSTEM, "question 0")
    assert first.status_code == 200, first.text
    cached = []
    for i in range(1, 6):
        r = chat(cluster.url, SYSTEM, f"question {i}")
        assert r.status_code == 200, r.text
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    delta = [after - b for after, b in zip(cluster.served(), before, strict=True)]
    assert sorted(delta) == [0, 6], delta  # all six on one replica
    assert min(cached) >= len(SYSTEM), cached  # each reused the whole system prompt


def test_different_prefixes_spread_over_both_replicas(cluster: Cluster) -> None:
    # cache_aware sends a prefix no replica holds to the least loaded one: concurrent requests
    # with distinct prefixes (each ~0.3 s long) spread.
    before = cluster.served()
    statuses: list[int] = []

    def one(i: int) -> None:
        words = f"{i} you speak like character number {i}. " * 30
        statuses.append(chat(cluster.url, words, "hello", max_tokens=60).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    delta = [after - b for after, b in zip(cluster.served(), before, strict=True)]
    assert statuses == [200] * 8
    assert sum(delta) == 8 and min(delta) >= 2, delta


def test_router_fields_that_mlctrio_cannot_honour_are_refused(cluster: Cluster) -> None:
    r = chat(cluster.url, "s", "u", no_stop_trim=True)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "no_stop_trim"


def _stream(url: str, lines: list[str], first_chunk: threading.Event) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 600,  # ~3 s at 5 ms a token: the drain is still going on meanwhile
        "ignore_eos": True,
        "stream": True,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "go"}],
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        lines.append(str(r.status_code))
        for line in r.iter_lines():
            if line:
                lines.append(line)
                first_chunk.set()
    first_chunk.set()


def test_sigterm_drains_a_replica_without_client_errors(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    try:
        c.start_replicas(2)
        c.start_router("cache_aware")
        lines: list[str] = []
        first_chunk = threading.Event()
        streamer = threading.Thread(target=_stream, args=(c.url, lines, first_chunk))
        streamer.start()
        assert first_chunk.wait(60)
        busy = [
            i
            for i, url in enumerate(c.replica_urls)
            if httpx.get(f"{url}/get_load", timeout=5).json()[0]["num_reqs"] == 1
        ]
        assert len(busy) == 1, busy
        draining = c.replicas[busy[0]]
        draining.popen.terminate()  # SIGTERM: drain
        statuses = []
        while streamer.is_alive():  # new requests with the same prefix while it drains
            statuses.append(chat(c.url, SYSTEM, f"during drain {len(statuses)}").status_code)
        streamer.join()
        wait_until(lambda: draining.popen.poll() is not None, "the drained replica to exit")
        statuses += [chat(c.url, SYSTEM, f"after {i}").status_code for i in range(3)]
        assert draining.popen.returncode == 0
        assert lines[0] == "200" and lines[-1] == "data: [DONE]", lines[-3:]
        last = json.loads(lines[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] == "length"
        assert sum(len(json.loads(x[6:])["choices"][0]["delta"].get("content", "")) > 0
                   for x in lines[1:-1]) == 600  # fmt: skip
        assert len(statuses) >= 4 and set(statuses) == {200}, statuses
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()
