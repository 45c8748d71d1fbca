"""End to end over HTTP with the real TVM engine and the demo model (random weights).

The tiny demo preset compiles in seconds and is cached on disk by the hash of its config, the
quantization, the target and the TVM version, so the whole module costs one compile per machine.
"""

from __future__ import annotations

import json
import random
import time

import httpx
import openai
import pytest

from .conftest import ServerHandle, raw_chat_post

MODEL = "demo://tiny"


@pytest.fixture
def demo(demo_server: ServerHandle) -> ServerHandle:
    return demo_server


@pytest.fixture
def client(demo: ServerHandle) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo.url + "/v1", api_key="x", max_retries=0)


def _idle(handle: ServerHandle) -> None:
    def idle() -> bool:
        s = handle.core_stats()
        cached = getattr(s, "num_cached_pages", 0)
        return (
            handle.engine.num_in_flight == 0
            and s.num_running == 0
            and s.num_waiting == 0
            and s.free_pages + cached == s.total_pages
        )

    handle.wait_until(idle, 30)


def _greedy(client: openai.OpenAI, text: str, max_tokens: int) -> list[int]:
    reply = client.completions.create(
        model=MODEL,
        prompt=text,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    tokens = reply.choices[0].logprobs.tokens  # type: ignore[union-attr]
    assert tokens is not None and len(tokens) == max_tokens
    return [hash(t) for t in tokens]  # token strings are enough to compare outputs


def test_debug_config_reports_the_resolved_engine(demo: ServerHandle) -> None:
    with demo.client() as http:
        config = http.get("/debug/config").json()["engine"]
    assert config["max_num_sequence"] == 16
    assert config["prefill_chunk_size"] == 256
    assert config["format"] == "hf"
    assert config["source"] in ("cache", "compiled")
    assert "GiB budget" in config["memory_summary"]


def test_greedy_output_is_the_same_alone_and_in_a_mixed_batch(
    demo: ServerHandle, client: openai.OpenAI
) -> None:
    prompts = [f"Request number {i}: " + "the quick brown fox " * (1 + 3 * i) for i in range(16)]
    alone = {i: _greedy(client, prompts[i], 12) for i in (0, 5, 11)}
    _idle(demo)
    results: dict[int, list[str]] = {}
    aborted = {3, 8, 13}

    def run(i: int) -> None:
        body = {
            "model": MODEL,
            "prompt": prompts[i],
            "max_tokens": 12 if i not in aborted else 200,
            "temperature": 0,
            "logprobs": 0,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream("POST", demo.url + "/v1/completions", json=body, timeout=60) as r:
            tokens: list[str] = []
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        tokens.extend((c.get("logprobs") or {}).get("tokens") or [])
                if i in aborted and len(tokens) >= 3:
                    return  # leave mid-stream: the server must abort it
            results[i] = tokens

    import threading

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, expected in alone.items():
        assert [hash(t) for t in results[i]] == expected, f"request {i} differs in a batch"
    assert all(len(results[i]) == 12 for i in range(16) if i not in aborted)
    _idle(demo)


def test_n3_and_seeded_sampling(client: openai.OpenAI) -> None:
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story"}],
        n=3,
        max_tokens=16,
        temperature=1.0,
        seed=42,
    )
    first = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    second = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    # Each branch has its own seed stream: with a random model they differ from each other.
    assert len({c.message.content for c in first.choices}) > 1
    assert first.usage is not None
    single = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=1
    )
    assert single.usage is not None and first.usage.prompt_tokens == single.usage.prompt_tokens


def test_stop_string_across_token_boundaries_never_leaks(client: openai.OpenAI) -> None:
    prompt = "Once upon a time"
    full = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=40,
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    tokens = full.choices[0].logprobs.tokens  # type: ignore[union-attr]
    text = full.choices[0].text
    assert tokens is not None and "".join(tokens) == text
    # A stop string made of the end of token k and the start of token k+1.
    boundary = None
    offset = 0
    for k in range(4, len(tokens) - 1):
        offset = len("".join(tokens[: k + 1]))
        if len(tokens[k]) >= 2 and len(tokens[k + 1]) >= 2:
            boundary = offset
            break
    assert boundary is not None, "no two multi-character tokens in a row"
    stop = text[boundary - 2 : boundary + 2]
    expected = text[: text.index(stop)]
    stream = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=40,
        temperature=0,
        stop=[stop],
        stream=True,
        extra_body={"ignore_eos": True},
    )
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert "".join(pieces) == expected
    for i in range(len(pieces)):
        assert stop not in "".join(pieces[: i + 1])


def test_fifty_streaming_clients_disconnecting_at_random(demo: ServerHandle) -> None:
    rng = random.Random(3)
    socks = []
    for i in range(50):
        body = {
            "model": MODEL,
            "stream": True,
            "max_tokens": rng.randint(5, 60),
            "messages": [{"role": "user", "content": f"client {i} " * rng.randint(1, 40)}],
            "ignore_eos": True,
        }
        socks.append(raw_chat_post(demo, body))
    for sock in socks:
        time.sleep(rng.random() * 0.05)
        if rng.random() < 0.6:
            sock.settimeout(2)
            try:
                sock.recv(rng.randint(1, 2048))
            except TimeoutError:
                pass
        sock.close()
    _idle(demo)
    with demo.client() as http:
        metrics = http.get("/metrics").text
    assert "mlctrio_requests_aborted_total" in metrics
