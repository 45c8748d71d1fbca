"""Issue 16, item 3: one large prompt must not freeze everyone.

A prompt that cannot fit the context window is refused by the tokenizer's cheap lower bound
(ceil(bytes / longest token)) without tokenizing; long texts are tokenized in pieces that give the
same ids as one call, stopping once the window is reached; HF tokenizers let go of the GIL while
they work; and the server answers /health while a multi-MiB prompt is being tokenized.
"""

from __future__ import annotations

import json
import random
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from mlctrio.errors import ContextLengthExceededError
from mlctrio.protocol.openai import parse_chat_request, parse_completion_request
from mlctrio.runtime.gguf_tokenizer import chat_template_from_gguf, tokenizer_from_gguf
from mlctrio.runtime.tokenizer import HFTokenizer, load_tokenizer
from mlctrio.server import long_text, prompts

from ..server import conftest as _servers
from ..server.conftest import make_config, start_server

server_factory = _servers.server_factory  # the shared fixture (tests/server/conftest.py)

WINDOW = 8192  # SmolLM2's context window
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]


@pytest.fixture(scope="module")
def smollm2_meta(smollm2_gguf: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(smollm2_gguf)
    return {key: field.contents() for key, field in reader.fields.items()}


@pytest.fixture(scope="module")
def gguf_tok(smollm2_meta: dict[str, Any]) -> HFTokenizer:
    return tokenizer_from_gguf(smollm2_meta)


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    from mlctrio.models.demo import ensure_demo_model

    return load_tokenizer(ensure_demo_model("tiny", cache_dir=tmp_path_factory.mktemp("demo")))


@pytest.fixture(params=["gguf", "hf"])
def tok(request: pytest.FixtureRequest) -> HFTokenizer:
    return request.getfixturevalue(f"{request.param}_tok")  # type: ignore[no-any-return]


class CountingTokenizer:
    """A tokenizer that records the length of every text it is asked to encode."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.encoded: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.encoded.append(len(text))
        return list(self.inner.encode(text, add_special_tokens=add_special_tokens))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def varied_text(n_chars: int, seed: int) -> str:
    """Prose, code, whitespace runs, digits, punctuation before newlines, non-Latin scripts,
    emoji, special-token texts and bytes the vocabulary lacks, mixed at random."""
    rng = random.Random(seed)
    words = ["the", "Paris", "naïve", "façade", "日本語", "Привет", "🙂", "x1234567", "don't"]
    parts = [
        lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))),
        lambda: "\n" * rng.randint(1, 4),
        lambda: " " * rng.randint(1, 40),
        lambda: "\t\n  \r\n",
        lambda: rng.choice([".\n", "!\n\n", "):\n    ", "{\n", ";\n"]),
        lambda: "def f(a, b):\n    return a + b  # sum\n",
        lambda: str(rng.randint(0, 10**12)),
        lambda: rng.choice(SPECIALS),
        lambda: rng.choice(["\x04", "\x1d", "\U00050000", "\u00a0", "\u2581"]),
    ]
    out: list[str] = []
    size = 0
    while size < n_chars:
        piece = rng.choice(parts)()
        out.append(piece)
        size += len(piece)
    return "".join(out)[:n_chars]


def test_bound_never_exceeds_the_token_count(tok: HFTokenizer) -> None:
    assert tok.max_token_bytes is not None
    texts = [varied_text(20_000, seed) for seed in range(4)] + [
        "\x04" * 500 + "a",  # characters the SmolLM2 vocabulary drops
        "\U00050000" * 300,
        "<|im_start|>" * 200,  # special tokens: longer than one byte each
        " " * 5000,
        "a" * 5000,
    ]
    for text in texts:
        assert 0 < tok.min_token_count(text) <= len(tok.encode(text)), text[:40]


def test_bound_grows_with_the_text(gguf_tok: HFTokenizer) -> None:
    longest = gguf_tok.max_token_bytes
    assert longest is not None
    assert gguf_tok.min_token_count("é" * 1000) == -(-2000 // longest)  # UTF-8 bytes, not chars


def test_huge_chat_prompt_refused_without_tokenizing(
    gguf_tok: HFTokenizer, smollm2_meta: dict[str, Any]
) -> None:
    template = chat_template_from_gguf(smollm2_meta, gguf_tok)
    counting = CountingTokenizer(gguf_tok)
    req = parse_chat_request(
        {"model": "m", "messages": [{"role": "user", "content": "Paris is big. " * 500_000}]}
    )
    with pytest.raises(ContextLengthExceededError) as caught:
        prompts.render_chat(req.messages, None, template, counting, context_window=WINDOW)
    assert caught.value.param == "messages"
    assert caught.value.code == "context_length_exceeded"
    assert f"maximum context length is {WINDOW} tokens" in str(caught.value)
    assert counting.encoded == []


def test_huge_completion_prompt_refused_before_any_prompt_is_tokenized(
    gguf_tok: HFTokenizer,
) -> None:
    counting = CountingTokenizer(gguf_tok)
    req = parse_completion_request({"model": "m", "prompt": ["a short one", "word " * 1_500_000]})
    with pytest.raises(ContextLengthExceededError) as caught:
        prompts.prompt_token_lists(req, counting, context_window=WINDOW)
    assert caught.value.param == "prompt"
    assert counting.encoded == []
    arrays = parse_completion_request({"model": "m", "prompt": [[1] * WINDOW]})
    with pytest.raises(ContextLengthExceededError):
        prompts.prompt_token_lists(arrays, counting, context_window=WINDOW)


def test_prompts_under_the_window_are_tokenized_as_before(gguf_tok: HFTokenizer) -> None:
    texts = parse_completion_request({"model": "m", "prompt": ["Hello there", "Bye"]})
    ids = prompts.prompt_token_lists(texts, gguf_tok, context_window=WINDOW)
    assert ids == [gguf_tok.encode(t, add_special_tokens=True) for t in ("Hello there", "Bye")]
    assert ids == prompts.prompt_token_lists(texts, gguf_tok)
    arrays = parse_completion_request({"model": "m", "prompt": [[1, 2, 3]]})
    assert prompts.prompt_token_lists(arrays, gguf_tok, context_window=WINDOW) == [[1, 2, 3]]


@pytest.mark.parametrize("seed", [0, 1])
def test_pieces_give_the_ids_of_one_encode(tok: HFTokenizer, seed: int) -> None:
    text = varied_text(60_000, seed)
    counting = CountingTokenizer(tok)
    for add_special_tokens in (False, True):
        whole = tok.encode(text, add_special_tokens=add_special_tokens)
        pieces = long_text.encode_text(
            text, counting, add_special_tokens=add_special_tokens, piece_chars=512
        )
        assert pieces == whole
    piece_calls = [n for n in counting.encoded if n > 2 * long_text.WINDOW]
    assert len(piece_calls) > 20  # it really was cut, many times


def test_long_prompt_stops_counting_at_the_window(gguf_tok: HFTokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog.\n" * 8000  # 360 kB, ~80k tokens
    assert gguf_tok.min_token_count(text) < WINDOW  # the cheap bound lets it through...
    counting = CountingTokenizer(gguf_tok)
    with pytest.raises(ContextLengthExceededError) as caught:
        long_text.encode_text(text, counting, stop_at=WINDOW, param="messages")
    assert caught.value.param == "messages"
    assert sum(counting.encoded) < len(text) // 4  # ...and counting stops near the window


def test_hf_encode_lets_other_threads_run(gguf_tok: HFTokenizer) -> None:
    """With a switch interval far beyond the test, the GIL changes hands only when a thread lets
    go of it: the other thread can only set `progressed` while encode runs if encode releases
    the GIL (the HF `encode` call holds it throughout)."""
    text = "Paris is the capital of France. " * 40_000
    entered, progressed = threading.Event(), threading.Event()

    def other() -> None:
        entered.wait(30)
        progressed.set()

    thread = threading.Thread(target=other)
    thread.start()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        entered.set()
        ids = gguf_tok.backend.encode(text, False)
        during = progressed.is_set()
    finally:
        sys.setswitchinterval(interval)
        thread.join(30)
    assert ids
    assert during


@attrs.define
class GatedTokenizer:
    """The echo tokenizer, stopping in the first encode of a long piece until released."""

    inner: Any
    entered: threading.Event = attrs.field(factory=threading.Event)
    release: threading.Event = attrs.field(factory=threading.Event)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if len(text) > 2 * long_text.WINDOW and not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(30), "the test never released the tokenizer"
        return list(self.inner.encode(text, add_special_tokens=add_special_tokens))

    def min_token_count(self, text: str) -> int:
        return 0  # no cheap bound: this tokenizer's text must be tokenized

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def echo_server() -> Iterator[Any]:
    handle = start_server(make_config(model="mock://echo"))
    yield handle
    handle.stop()


def test_health_answers_while_a_big_prompt_is_tokenized(echo_server: Any) -> None:
    info = echo_server.engine.info
    gated = GatedTokenizer(info.tokenizer)
    echo_server.engine.info = attrs.evolve(info, tokenizer=gated)
    body = {"model": "mock://echo", "messages": [{"role": "user", "content": "ab " * 1_000_000}]}
    answers: list[httpx.Response] = []

    def post() -> None:
        with echo_server.client() as client:
            answers.append(
                client.post(
                    "/v1/chat/completions",
                    content=json.dumps(body),
                    headers={"Content-Type": "application/json"},
                )
            )

    poster = threading.Thread(target=post)
    poster.start()
    try:
        assert gated.entered.wait(30), "the big prompt never reached the tokenizer"
        with echo_server.client() as client:
            health = client.get("/health")
        assert health.status_code == 200
        assert not answers  # the big request is still inside the tokenizer
    finally:
        gated.release.set()
        poster.join(60)
    [answer] = answers
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "context_length_exceeded"
    assert answer.json()["error"]["param"] == "messages"


def test_the_routes_refuse_by_the_bound_before_tokenizing(server_factory) -> None:  # type: ignore[no-untyped-def]
    """Chat and completions pass the context window to the bound: a prompt whose byte length
    alone proves it too long is refused without one call to the tokenizer's encode."""
    handle = server_factory(model="mock://echo?context_window=512")
    tokenizer = handle.engine.info.tokenizer
    calls = []
    original = tokenizer.encode

    def counting_encode(text: str, add_special_tokens: bool = False) -> list[int]:
        calls.append(len(text))
        return original(text, add_special_tokens)

    tokenizer.encode = counting_encode
    big = "x" * 200_000
    bodies = {
        "/v1/chat/completions": {"messages": [{"role": "user", "content": big}], "max_tokens": 4},
        "/v1/completions": {"prompt": big, "max_tokens": 4},
    }
    with handle.client() as client:
        for path, body in bodies.items():
            r = client.post(path, json={"model": "mock://echo", **body})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "context_length_exceeded"
            assert "at least" in r.json()["error"]["message"]
        assert calls == []
        small = client.post(
            "/v1/completions", json={"model": "mock://echo", "prompt": "hello", "max_tokens": 2}
        )
    assert small.status_code == 200
    assert calls  # the small prompt was tokenized by the same (counting) encode
